"""Rollout logging of the GRPO stage and the tools that read it back.

* `_write_rollouts`: every column the issue lists (parsed answer, truncated, ...) on canned completions
  whose answers, rewards and truncation are known; a sampled wandb Table per step under its own key,
  written by an offline WandbLogger into the run directory's wandb folder (WANDB_MODE=offline, no
  network), and none without a WandbLogger;
* `urt.rollouts`: summaries, zero-variance counts, per-task accuracy, group views with their images
  (found by key in the shards, in presented order), CSV metrics and the offline wandb run, on
  hand-written rollout tables with known answers;
* `experiments/notebooks/inspect_rollouts.ipynb` executes cleanly (nbclient, the venv's python as
  kernel) against a tiny 3-step GRPO run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from grpo_fixtures import grpo_cfg, write_grpo_prompts
from urt.errors import UrtError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "notebooks" / "inspect_rollouts.ipynb"
REQUIRED = {"step", "prompt_key", "group", "sample", "sample_key", "task", "prompt", "completion", "answer",
            "winner", "label", "swapped", "reward_format", "reward_accuracy", "reward", "advantage", "truncated",
            "completion_length", "kept", "rank"}
WANDB_VARS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: one thread beats two on 2 cores


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 image-generation prompts (labels 1/2), 2 shards."""
    return write_grpo_prompts(tmp_path_factory.mktemp("rollout_shards"))


@pytest.fixture
def wandb_env(monkeypatch):
    """WANDB_MODE=offline, and the WANDB_* folder variables unset for the test and removed afterwards,
    so urt.stages.run.loggers points them into this test's run directory (and no later test inherits them)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in WANDB_VARS:
        monkeypatch.setenv(var, "unset")  # records the original value for teardown ...
        monkeypatch.delenv(var)  # ... then leaves it unset for _loggers' setdefault
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()


def _cfg(tmp_path, shards, *overrides, steps=1):
    return grpo_cfg(tmp_path, shards, *overrides, steps=steps)


def _train(cfg):
    import wandb

    from urt.train import train

    train(cfg)
    if wandb.run is not None:  # flush the offline run (a CLI run does this at exit)
        wandb.finish()
    return Path(cfg.stage.run_dir)


# ------------------------------------------------------------------------------------ pure helpers
def test_parsed_answers():
    from urt.prompts import answer_string
    from urt.rl.rollout_log import parsed_answers

    a1, a2 = answer_string("image_generation", 1), answer_string("image_generation", 2)
    texts = [f"<think>x</think><answer>{a1}</answer>", f"<answer>{a2}</answer>", "<answer>maybe</answer>",
             "no tags", None, f"<think>x</think><answer>{answer_string('video_generation', 1)}</answer>"]
    answers, winners = parsed_answers(texts, ["image_generation"] * 6)
    assert answers == [a1, a2, "maybe", None, None, answer_string("video_generation", 1)]
    assert winners == ["1", "2", None, None, None, None]  # another task's string is no answer


def test_sample_table_rows():
    from urt.rl.rollout_log import sample_table_rows

    groups = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    rows = sample_table_rows(groups, 7, "s")
    assert len(rows) == 7 and rows == sorted(rows)
    assert rows == sample_table_rows(groups, 7, "s")  # seeded
    picked = [groups[i] for i in rows]
    full = [g for g in set(picked) if picked.count(g) == 3]
    assert len(full) == 2  # whole groups first, the last one cut
    assert sample_table_rows(groups, 100, 0) == list(range(12))
    assert sample_table_rows(groups, 0, 0) == [] and sample_table_rows([], 5, 0) == []
    assert {frozenset(sample_table_rows(groups, 3, s)) for s in range(20)} != {frozenset(rows[:3])}  # varies


# ------------------------------------------------------------------------------------ GRPO: columns + wandb
def _canned(long_text: str):
    def canned(bundle, prompts, cfg, **kw):
        from urt.prompts import answer_string

        out = []
        for p in prompts:
            ans = answer_string(p.task, int(p.label))
            other = answer_string(p.task, 3 - int(p.label))
            out.append([f"<think>ok</think><answer>{ans}</answer>", f"<think>ok</think><answer>{other}</answer>",
                        "no format", long_text][: cfg.num_return_sequences])
        return out

    return canned


def test_rollout_columns_and_wandb_table(tmp_path, shards, monkeypatch, wandb_env):
    """2 steps x 2 prompts x G=4 canned completions (right, wrong, no format, cut at max_new_tokens): the
    parquet has every column with the known values; an offline WandbLogger gets a 5-row Table per step
    under rollouts/step_NNNNNN, written inside the run directory."""
    import urt.generation
    from urt.rollouts import load_wandb

    long_text = "lorem ipsum dolor sit amet " * 20
    monkeypatch.setattr(urt.generation, "generate", _canned(long_text))
    cfg = _cfg(tmp_path, shards, "logger=wandb", "stage.run_name=wb", "stage.loss.beta=0", "stage.num_generations=4",
               "stage.max_new_tokens=24", "stage.rollout_table_rows=5", "stage.micro_batch_size=8", steps=2)
    run = _train(cfg).resolve()

    for step in (1, 2):
        t = pq.read_table(run / "rollouts" / f"step-{step:06d}.parquet")
        df = t.to_pandas()
        assert REQUIRED <= set(df.columns), REQUIRED - set(df.columns)
        assert len(df) == 8 and set(df["step"]) == {step} and list(df["group"]) == [0] * 4 + [1] * 4
        assert list(df["sample"]) == [0, 1, 2, 3] * 2
        assert list(df["sample_key"]) == [f"{k}#{s}" for k, s in zip(df["prompt_key"], df["sample"])]
        assert list(df["truncated"]) == [False, False, False, True] * 2
        assert list(df["completion_length"][3::4]) == [24, 24]  # cut: all max_new_tokens, no EOS
        assert all(n < 24 for i, n in enumerate(df["completion_length"]) if i % 4 != 3)
        assert list(df["reward_accuracy"]) == [1.0, 0.0, 0.0, 0.0] * 2
        assert list(df["reward_format"]) == [1.0, 1.0, 0.0, 0.0] * 2
        for _, r in df.iterrows():  # the parsed winner is the label's on sample 0, the other one on 1
            want = {0: r["label"], 1: str(3 - int(r["label"]))}.get(r["sample"])
            assert pd.isna(r["winner"]) if want is None else r["winner"] == want
            assert pd.isna(r["answer"]) == (r["sample"] >= 2)
            assert r["swapped"] in (True, False)
        assert t.schema.field("answer").type == "string" and t.schema.field("truncated").type == "bool"

    # the wandb run lives in the run directory, offline, with its cache / config / data folders there too
    for var, sub in zip(WANDB_VARS, ("wandb", "wandb/cache", "wandb/config", "wandb/data")):
        assert os.environ[var] == str(run / sub)
    folders = list((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 1
    media = folders[0] / "files" / "media" / "table" / "rollouts"
    for step in (1, 2):
        [tab] = list(media.glob(f"step_{step:06d}_*.table.json"))
        d = json.loads(tab.read_text())
        parquet = pq.read_table(run / "rollouts" / f"step-{step:06d}.parquet").to_pandas()
        assert d["columns"] == list(parquet.columns)
        assert len(d["data"]) == 5
        rows = pd.DataFrame(d["data"], columns=d["columns"])
        assert sorted(rows["group"].value_counts().tolist()) == [1, 4]  # one whole group, one cut
        merged = rows.merge(parquet, on="sample_key", suffixes=("", "_pq"))
        assert len(merged) == 5 and (merged["completion"] == merged["completion_pq"]).all()
        assert (merged["reward"] == merged["reward_pq"]).all()

    wb = load_wandb(run)
    assert wb is not None and sorted(wb.tables) == [1, 2] and len(wb.tables[2]) == 5
    assert wb.history is not None and "trainer/global_step" in wb.history.columns, wb.note
    assert {"rollouts/step_000001", "rollouts/step_000002"} <= set(wb.history.columns)
    ref = wb.history["rollouts/step_000002"].dropna().iloc[0]
    assert ref["_type"] == "table-file" and ref["nrows"] == 5
    assert "train/reward" in wb.history.columns


def test_no_wandb_logger_no_table(tmp_path, shards, monkeypatch):
    """logger=csv: the parquet is written, no wandb folder; rollouts=false and no wandb: nothing at all."""
    import urt.generation

    monkeypatch.setattr(urt.generation, "generate", _canned("x " * 40))
    run = _train(_cfg(tmp_path, shards, "stage.run_name=csvonly", "stage.loss.beta=0", "stage.num_generations=4",
                      "stage.max_new_tokens=24"))
    assert (run / "rollouts" / "step-000001.parquet").is_file() and not (run / "wandb").exists()
    run2 = _train(_cfg(tmp_path, shards, "stage.run_name=off", "stage.loss.beta=0", "stage.num_generations=4",
                       "stage.max_new_tokens=24", "stage.rollouts=false"))
    assert not (run2 / "rollouts").exists()


# ------------------------------------------------------------------------------------ urt.rollouts
def _fake_run(tmp_path: Path, shards: str) -> Path:
    """A run directory with hand-written rollout tables (2 steps, 2 groups of 3), a config naming the
    shards, and two metrics.csv files (the second a resume repeating step 2)."""
    from urt.rl.rollout_log import rollout_arrow_table

    run = tmp_path / "fake_run"
    (run / "rollouts").mkdir(parents=True)
    (run / "config.yaml").write_text(f"data:\n  train_shards: {shards}\n")
    # step 1: group 0 (ig-0, label 1) mixed, group 1 (ig-1, label 2 in the shard, presented swapped: 1) all
    # wrong with equal rewards
    # step 2: group 0 (ig-2) all correct, group 1 (ig-3, video task name to test per-task accuracy) mixed
    steps = {
        1: [("ig-0", "image_generation", "1", False, [1, 0, 1], [2.0, 1.0, 2.0], [5, 9, 24], [False, False, True]),
            ("ig-1", "image_generation", "1", True, [0, 0, 0], [1.0, 1.0, 1.0], [6, 6, 6], [False] * 3)],
        2: [("ig-2", "image_generation", "1", False, [1, 1, 1], [2.0, 2.0, 2.0], [4, 4, 4], [False] * 3),
            ("ig-3", "image_understanding", "2", False, [0, 1, 0], [0.0, 2.0, 1.0], [24, 3, 3], [True, False, False])],
    }
    for step, groups in steps.items():
        cols: dict[str, list] = {k: [] for k in ("step", "rank", "prompt_key", "group", "sample", "sample_key",
                                                 "task", "label", "swapped", "prompt", "completion", "answer",
                                                 "winner", "reward_format", "reward_accuracy", "reward",
                                                 "advantage", "completion_length", "truncated", "kept")}
        for g, (key, task, label, swapped, acc, rew, lens, cut) in enumerate(groups):
            for s in range(3):
                win = label if acc[s] else str(3 - int(label))
                vals = dict(step=step, rank=0, prompt_key=key, group=g, sample=s, sample_key=f"{key}#{s}",
                            task=task, label=label, swapped=swapped, prompt=f"prompt {key}",
                            completion=f"<think>t</think><answer>Image {win} is better</answer>",
                            answer=f"Image {win} is better", winner=win, reward_format=rew[s] - acc[s],
                            reward_accuracy=float(acc[s]), reward=rew[s], advantage=0.0,
                            completion_length=lens[s], truncated=cut[s], kept=True)
                for k, v in vals.items():
                    cols[k].append(v)
        pq.write_table(rollout_arrow_table(cols), run / "rollouts" / f"step-{step:06d}.parquet")
    v0, v1 = run / "csv" / "version_0", run / "csv" / "version_1"
    v0.mkdir(parents=True), v1.mkdir(parents=True)
    (v0 / "metrics.csv").write_text("step,train/reward,train/kl\n0,1.0,0.0\n1,1.5,\n1,,0.1\n")
    (v1 / "metrics.csv").write_text("step,train/reward,train/kl\n1,1.25,0.2\n")
    return run


def test_rollout_summaries(tmp_path, shards):
    from urt.rollouts import group_stats, load_rollouts, step_summary, task_accuracy, zero_variance

    df = load_rollouts(_fake_run(tmp_path, shards))
    assert len(df) == 12 and list(df["step"].unique()) == [1, 2]
    assert (df["accuracy"] == df["reward_accuracy"]).all()
    s = step_summary(df)
    assert list(s.index) == [1, 2] and list(s["rollouts"]) == [6, 6] and list(s["groups"]) == [2, 2]
    assert s.loc[1, "reward"] == pytest.approx(8 / 6) and s.loc[2, "reward"] == pytest.approx(9 / 6)
    assert s.loc[1, "accuracy"] == pytest.approx(2 / 6) and s.loc[2, "accuracy"] == pytest.approx(4 / 6)
    assert s.loc[1, "reward_std"] == pytest.approx(pd.Series([2.0, 1.0, 2.0]).std() / 2)
    assert s.loc[1, "truncated"] == pytest.approx(1 / 6) and s.loc[2, "completion_length_max"] == 24
    assert s.loc[1, "reward_format"] == pytest.approx(6 / 6)
    acc = task_accuracy(df)
    assert acc.loc[1, "image_generation"] == pytest.approx(2 / 6)
    assert acc.loc[2, "image_generation"] == 1.0 and acc.loc[2, "image_understanding"] == pytest.approx(1 / 3)
    assert pd.isna(acc.loc[1, "image_understanding"])
    zv = zero_variance(df)
    assert zv.loc[1].to_dict() == {"groups": 2, "zero_variance": 1, "all_correct": 0, "all_wrong": 1,
                                   "zero_variance_share": 0.5}
    assert zv.loc[2, "all_correct"] == 1 and zv.loc[2, "zero_variance"] == 1 and zv.loc[2, "all_wrong"] == 0
    gs = group_stats(df)
    assert gs.loc[(1, 1), "prompt_key"] == "ig-1" and bool(gs.loc[(1, 1), "zero_variance"])


def test_accuracy_without_the_accuracy_reward(tmp_path, shards):
    from urt.rollouts import load_rollouts

    run = _fake_run(tmp_path, shards)
    for f in (run / "rollouts").glob("*.parquet"):
        pq.write_table(pq.read_table(f).drop(["reward_accuracy"]), f)
    df = load_rollouts(run)
    assert list(df["accuracy"][:6]) == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # winner == label


def test_group_view_with_images(tmp_path, shards):
    """The largest-spread groups first; images found by key in the config's shards, a swapped pair shown
    swapped; an unknown key or missing shards leave a note, not an error."""
    from PIL import ImageChops

    from urt.data.shards import read_shards
    from urt.rollouts import find_samples, group_view, load_rollouts, plot_group

    run = _fake_run(tmp_path, shards)
    df = load_rollouts(run)
    views = group_view(df, run, step=1, n=2)
    assert [v.group for v in views] == [0, 1] and [v.prompt_key for v in views] == ["ig-0", "ig-1"]
    assert list(views[0].rows["reward"]) == [2.0, 1.0, 2.0] and "completion" in views[0].rows
    src = {s.key: s for s in read_shards(shards)}
    same = lambda a, b: ImageChops.difference(a, b).getbbox() is None  # noqa: E731
    v0, v1 = views
    assert same(v0.sample.visuals[0], src["ig-0"].visuals[0]) and v0.sample.label == 1
    assert same(v1.sample.visuals[0], src["ig-1"].visuals[1]) and v1.sample.label == 1  # shown swapped
    assert [t for t, _ in v0.visuals()] == ["Image 1", "Image 2"] and v0.pair_text() == "caption: picture 0"
    fig = plot_group(v0)
    assert len(fig.axes) == 3  # two images + the text panel
    [top] = group_view(df, run, step=2, n=1)
    assert top.group == 1  # ig-3 has reward spread, ig-2 none
    [g] = group_view(df, step=2, groups=[0])
    assert g.sample is None and "no shards" in g.note and g.pair_text() == "prompt: prompt ig-2"
    assert len(plot_group(g).axes) == 1  # text only
    [g] = group_view(df, step=2, groups=[0], shards=str(tmp_path / "moved"))
    assert g.sample is None and "could not be read" in g.note and "no such shard" in g.note
    with pytest.raises(UrtError, match="no groups"):
        group_view(df, run, step=2, groups=[5])
    with pytest.raises(UrtError, match="no rollouts at step 9"):
        group_view(df, run, step=9)
    assert find_samples(shards, ["nope", "ig-5"]).keys() == {"ig-5"}


def test_load_metrics_and_errors(tmp_path, shards):
    from urt.rollouts import load_metrics, load_rollouts, load_wandb

    run = _fake_run(tmp_path, shards)
    m = load_metrics(run)
    assert list(m.index) == [0, 1] and m.loc[1, "train/reward"] == 1.25 and m.loc[1, "train/kl"] == 0.2
    assert load_wandb(run) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UrtError, match="no rollout tables"):
        load_rollouts(empty)
    with pytest.raises(UrtError, match="no metrics.csv"):
        load_metrics(empty)
    assert load_metrics(empty, missing_ok=True).empty
    with pytest.raises(UrtError, match="does not exist"):
        load_rollouts(tmp_path / "missing")


def test_wandb_records_reads_split_records(tmp_path):
    """The .wandb reader reassembles records split over 32 KiB blocks (first/middle/last chunks)."""
    import struct

    from urt.rollouts import wandb_records

    recs = [b"a" * 10, b"b" * 70000, b"c" * 5]
    out, pos = bytearray(b":W&B\xe1\xbe\x00"), 7

    def chunk(kind, data):
        nonlocal pos
        out.extend(struct.pack("<IHB", 0, len(data), kind) + data)
        pos += 7 + len(data)

    for r in recs:
        first = True
        while True:
            left = 32768 - pos % 32768
            if left < 7:
                out.extend(b"\0" * left)
                pos += left
                continue
            room = left - 7
            if len(r) <= room:
                chunk(1 if first else 4, r)
                break
            chunk(2 if first else 3, r[:room])
            r, first = r[room:], False
    f = tmp_path / "x.wandb"
    f.write_bytes(bytes(out) + b"\x00\x00\x00\x00\x10\x00\x01trunc")  # a cut-off last record is dropped
    assert list(wandb_records(f)) == recs
    (tmp_path / "bad.wandb").write_bytes(b"nope")
    with pytest.raises(UrtError, match="not a wandb record file"):
        list(wandb_records(tmp_path / "bad.wandb"))


# ------------------------------------------------------------------------------------ the notebook
def test_notebook_is_committed_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "URT_RUN_DIR" in code[0].source and "RUN_DIR" in code[0].source
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 6


@pytest.mark.slow
def test_notebook_executes_on_a_tiny_run(tmp_path, shards, monkeypatch, wandb_env):
    """A 3-step tiny GRPO run (real generation, offline wandb), then the notebook top to bottom in a
    kernel running this venv's python, pointed at the run by URT_RUN_DIR."""
    import nbformat
    from nbclient import NotebookClient

    run = _train(_cfg(tmp_path, shards, "logger=wandb", "stage.run_name=nb", "stage.loss.beta=0.04", steps=3))
    assert len(list((run / "rollouts").glob("step-*.parquet"))) == 3

    # a kernel spec naming this interpreter, in a tmp JUPYTER_PATH (nothing written outside tmp)
    spec = tmp_path / "jupyter" / "kernels" / "urt-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "urt test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("URT_RUN_DIR", str(run))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('KERNEL', sys.executable)"))
    NotebookClient(nb, kernel_name="urt-test", timeout=300,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    out = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"KERNEL {sys.executable}" in out
    assert f"run {run.resolve()}: 3 steps, 18 rollouts, 6 groups" in out
    assert "wandb: 1 offline run folder(s), tables for steps [1, 2, 3]" in out
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    assert images >= 6  # curves, per-task accuracy, zero variance, lengths, >= 2 groups
    tables = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("completion" in t and "winner" in t for t in tables)  # a group's completions table
