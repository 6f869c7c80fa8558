"""Stage 2 rejection sampling (urt/stages/rejection.py, `urt sample`): canned completions through a
patched `generate` give exact SFT/GRPO splits, keep semantics and summary numbers; resume; and one real
end-to-end run of the tiny model through the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data_fixtures import vqa_image, vqa_question
from urt.data.datamodule import swap_decision
from urt.data.encode import OverlongSample
from urt.data.schema import Sample
from urt.data.shards import read_index, read_shards, write_shards
from urt.errors import UrtError
from urt.prompts import answer_string, default_template_set
from urt.stages.rejection import rejection_sample

IG, IU = "image_generation", "image_understanding"


def good(answer: str, i: int) -> str:
    return f"<think>trace {i}: reasons</think>\n<answer>{answer}</answer>"


def A(task, w):
    return answer_string(task, w)


# key -> the K=3 canned completions (index i is trace i) and which are correct (format 1 and accuracy 1)
CANNED = {
    "ig-0": [good(A(IG, 1), 0), good(A(IG, 2), 1), f"<answer>{A(IG, 1)}</answer>"],  # label 1: T F F
    "ig-1": [good(A(IG, 1), 0), good(A(IG, 2), 1), good(A(IG, 2), 2)],  # label 2: F T T
    "ig-3": [f"<answer>{A(IG, 1)}</answer>", good(A(IG, 2), 1), "garbage"],  # label 1: F F F
    "iu-0": [good(A(IU, 2), 0), good(A(IU, 2), 1), good(A(IU, 2), 2)],  # label 2: T T T
    "iu-1": [good(A(IU, 2), 0), f"<think>x</think><answer>{A(IU, 1)}", good(A(IU, 2), 2)],  # label 1: F F F
}
CORRECT = {"ig-0": [0], "ig-1": [1, 2], "ig-3": [], "iu-0": [0, 1, 2], "iu-1": []}


def samples() -> list[Sample]:
    q, a, img = vqa_question(0)
    q2, a2, img2 = vqa_question(1)
    return [
        Sample("ig-0", IG, 1, [vqa_image(1), vqa_image(2)], caption="a blue circle", source="t", meta={"n": 0}),
        Sample("ig-1", IG, 2, [vqa_image(3), vqa_image(4)], caption="a red square", source="t"),
        Sample("ig-2", IG, "tie", [vqa_image(5), vqa_image(6)], caption="a tie", source="t"),
        Sample("ig-3", IG, 1, [vqa_image(7), vqa_image(8)], caption="green", source="t",
               cot=good(A(IG, 1), 9)),  # an existing cot is ignored for prompting
        Sample("iu-0", IU, 2, [img], question=q, answers=("no idea", a), source="u"),
        Sample("iu-1", IU, 1, [img2], question=q2, answers=(a2, "maybe"), source="u"),
    ]


@pytest.fixture(scope="module")
def bundle():
    from urt.config import compose_config
    from urt.models import load_model

    return load_model(**OmegaConf.to_container(compose_config([]).model, resolve=True))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    write_shards(samples(), d, prefix="pairs", maxcount=4)
    return d


class FakeGenerate:
    """Canned completions per key; records every generated key; optionally fails on call `fail_on`."""

    def __init__(self, table=None, fail_on=None):
        self.table, self.fail_on, self.calls, self.keys, self.cfgs = table, fail_on, 0, [], []

    def __call__(self, bundle, prompts, cfg, *, progress=False, desc="generating"):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise RuntimeError("interrupted")
        self.cfgs.append(cfg)
        out = []
        for p in prompts:
            self.keys.append(p.key)
            if self.table is not None:
                out.append(list(self.table[p.key])[: cfg.num_return_sequences])
            else:  # always right for the label as presented
                out.append([good(A(p.task, int(p.label)), i) for i in range(cfg.num_return_sequences)])
        return out


def run(bundle, src, out, monkeypatch, fake=None, **kw):
    fake = fake or FakeGenerate(CANNED)
    monkeypatch.setattr("urt.generation.generate", fake)
    kw.setdefault("k", 3)
    kw.setdefault("progress", False)
    return rejection_sample(bundle, src, out, **kw), fake


def shard_samples(d):
    return list(read_shards(d))


def test_split_keep_first_and_summary(bundle, src, tmp_path, monkeypatch):
    rep, fake = run(bundle, src, tmp_path / "o", monkeypatch, batch_size=2, temperature=0.7, top_p=0.9,
                    max_new_tokens=5)
    assert sorted(fake.keys) == ["ig-0", "ig-1", "ig-3", "iu-0", "iu-1"]  # tie ig-2 never generated
    cfg = fake.cfgs[0]
    assert (cfg.num_return_sequences, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.batch_size) == (3, 0.7, 0.9, 5, 2)
    sft = {s.key: s for s in shard_samples(rep.sft_dir)}
    assert sorted(sft) == ["ig-0", "ig-1", "iu-0"]
    assert sft["ig-0"].cot == CANNED["ig-0"][0]
    assert sft["ig-1"].cot == CANNED["ig-1"][1]
    assert sft["iu-0"].cot == CANNED["iu-0"][0]
    assert sft["ig-0"].label == 1 and sft["ig-0"].meta["n"] == 0
    assert sft["ig-1"].meta["rejection"] == {"trace": 1, "correct": 2, "k": 3}
    grpo = {s.key: s for s in shard_samples(rep.grpo_dir)}
    assert sorted(grpo) == ["ig-3", "iu-1"]
    assert all(s.cot is None for s in grpo.values())  # ig-3's source cot is dropped
    src_by_key = {s.key: s for s in samples()}
    assert grpo["iu-1"].answers == src_by_key["iu-1"].answers and grpo["iu-1"].label == 1
    assert grpo["ig-3"].caption == "green" and grpo["ig-3"].label == 1

    tok = bundle.tokenizer
    ntok = {k: sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in v) for k, v in CANNED.items()}
    summ = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summ == rep.summary
    ig, iu, tot = summ["tasks"][IG], summ["tasks"][IU], summ["total"]
    assert ig["pairs"] == 3 and ig["traces"] == 9 and ig["correct_traces"] == 3
    assert ig["accuracy"] == pytest.approx(3 / 9) and ig["format_rate"] == pytest.approx(6 / 9)
    assert ig["all_wrong"] == 1 and ig["all_wrong_rate"] == pytest.approx(1 / 3)
    assert ig["mean_completion_tokens"] == pytest.approx((ntok["ig-0"] + ntok["ig-1"] + ntok["ig-3"]) / 9)
    assert (ig["sft_pairs"], ig["sft_samples"], ig["grpo_pairs"], ig["skipped"]) == (2, 2, 1, {"tie": 1})
    assert iu["pairs"] == 2 and iu["accuracy"] == pytest.approx(0.5) and iu["format_rate"] == pytest.approx(5 / 6)
    assert iu["all_wrong_rate"] == pytest.approx(0.5) and iu["skipped"] == {}
    assert iu["mean_completion_tokens"] == pytest.approx((ntok["iu-0"] + ntok["iu-1"]) / 6)
    assert tot["pairs"] == 5 and tot["traces"] == 15 and tot["accuracy"] == pytest.approx(6 / 15)
    assert tot["format_rate"] == pytest.approx(11 / 15) and tot["all_wrong_rate"] == pytest.approx(2 / 5)
    assert (tot["sft_pairs"], tot["sft_samples"], tot["grpo_pairs"], tot["skipped"]) == (3, 3, 2, {"tie": 1})
    assert summ["run"] == {"generated": 5, "resumed": 0, "stale_records": 0}
    lines = (tmp_path / "o" / "rollouts.jsonl").read_text().splitlines()
    head, recs = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    assert head["settings"]["k"] == 3 and len(recs) == 5
    r = {x["key"]: x for x in recs}
    assert r["ig-0"]["rewards"] == {"format": [1.0, 1.0, 0.0], "accuracy": [1.0, 0.0, 1.0]}
    assert r["ig-0"]["completions"] == CANNED["ig-0"] and r["iu-0"]["label"] == 2 and r["iu-0"]["task"] == IU
    assert [i for i, c in enumerate(r["iu-1"]["correct"]) if c] == []
    assert read_index(rep.sft_dir)["total"] == 3 and read_index(rep.grpo_dir)["total"] == 2
    assert rep.table().row_count == 3  # two tasks + total


def test_keep_all_and_random(bundle, src, tmp_path, monkeypatch):
    rep, _ = run(bundle, src, tmp_path / "all", monkeypatch, keep="all")
    sft = {s.key: s for s in shard_samples(rep.sft_dir)}
    want = {f"{k}#{i}": CANNED[k][i] for k, idx in CORRECT.items() for i in idx}
    assert {k: s.cot for k, s in sft.items()} == want
    assert rep.summary["total"]["sft_samples"] == 6 and rep.summary["total"]["sft_pairs"] == 3

    for seed in (0, 1, 2, 3):
        rep, _ = run(bundle, src, tmp_path / f"rand{seed}", monkeypatch, keep="random", seed=seed)
        sft = {s.key: s for s in shard_samples(rep.sft_dir)}
        assert sorted(sft) == ["ig-0", "ig-1", "iu-0"]
        for key, s in sft.items():
            pick = random.Random(f"urt-keep/{seed}/{key}").choice(CORRECT[key])
            assert s.cot == CANNED[key][pick] and s.meta["rejection"]["trace"] == pick

    # keep may change on a rerun: shards are rebuilt from rollouts.jsonl, nothing is generated again
    fake = FakeGenerate(CANNED)
    rep, _ = run(bundle, src, tmp_path / "rand0", monkeypatch, fake=fake, keep="first")
    assert fake.keys == [] and rep.resumed == 5
    assert {s.key: s.cot for s in shard_samples(rep.sft_dir)} == {"ig-0": CANNED["ig-0"][0],
                                                                    "ig-1": CANNED["ig-1"][1],
                                                                    "iu-0": CANNED["iu-0"][0]}


def test_to_grpo_any_wrong_sends_mixed_pairs_to_grpo_too(bundle, src, tmp_path, monkeypatch):
    """to_grpo="any_wrong": a pair with at least one wrong trace is a GRPO prompt (its groups are the ones with
    reward variance); a pair with a correct trace still gives its SFT sample. Changing it on a rerun rebuilds
    the shards from rollouts.jsonl without generating again."""
    run(bundle, src, tmp_path / "o", monkeypatch)
    fake = FakeGenerate(CANNED)
    rep, _ = run(bundle, src, tmp_path / "o", monkeypatch, fake=fake, to_grpo="any_wrong")
    assert fake.keys == [] and rep.resumed == 5
    assert sorted(s.key for s in shard_samples(rep.sft_dir)) == ["ig-0", "ig-1", "iu-0"]
    grpo = {s.key: s for s in shard_samples(rep.grpo_dir)}
    assert sorted(grpo) == ["ig-0", "ig-1", "ig-3", "iu-1"]  # iu-0: all three traces correct
    assert {k: s.meta["rejection"] for k, s in grpo.items()} == {
        "ig-0": {"correct": 1, "k": 3}, "ig-1": {"correct": 2, "k": 3}, "ig-3": {"correct": 0, "k": 3},
        "iu-1": {"correct": 0, "k": 3}}
    assert all(s.cot is None for s in grpo.values())
    summ = rep.summary
    assert summ["settings"]["to_grpo"] == "any_wrong" and summ["total"]["grpo_pairs"] == 4
    assert summ["total"]["all_wrong"] == 2 and summ["tasks"][IG]["grpo_pairs"] == 3
    with pytest.raises(UrtError, match="to_grpo must be one of all_wrong, any_wrong"):
        run(bundle, src, tmp_path / "bad", monkeypatch, to_grpo="majority")


def test_order_random_presents_swapped_pairs(bundle, src, tmp_path, monkeypatch):
    seed = 5
    rep, fake = run(bundle, src, tmp_path / "o", monkeypatch, fake=FakeGenerate(None), order="random", seed=seed, k=2)
    swaps = {s.key: swap_decision(seed, 0, s.key) for s in samples() if s.label != "tie"}
    assert any(swaps.values()) and not all(swaps.values())
    src_by_key = {s.key: s for s in samples()}
    sft = {s.key: s for s in shard_samples(rep.sft_dir)}
    assert sorted(sft) == sorted(swaps) and rep.summary["total"]["accuracy"] == 1.0
    for key, sw in swaps.items():
        s, orig = sft[key], src_by_key[key]
        assert s.label == (3 - orig.label if sw else orig.label)
        assert s.cot == good(A(s.task, s.label), 0)  # the trace was written for the presented order
        assert bool(s.meta.get("swapped")) == sw
        if s.task == IU:
            assert s.answers == (tuple(reversed(orig.answers)) if sw else orig.answers)
        else:
            first = s.visuals[0].tobytes()
            assert first == (orig.visuals[1] if sw else orig.visuals[0]).tobytes()


def _outputs(d: Path):
    summ = json.loads((d / "summary.json").read_text())
    summ.pop("run"), summ.pop("outputs")
    recs = sorted((d / "rollouts.jsonl").read_text().splitlines()[1:])
    tars = {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.glob("*/*.tar"))}
    return summ, recs, tars


def test_resume_after_interrupt(bundle, src, tmp_path, monkeypatch):
    full, _ = run(bundle, src, tmp_path / "full", monkeypatch, batch_size=2, keep="all")
    with pytest.raises(RuntimeError, match="interrupted"):
        run(bundle, src, tmp_path / "cut", monkeypatch, fake=FakeGenerate(CANNED, fail_on=2), batch_size=2, keep="all")
    lines = (tmp_path / "cut" / "rollouts.jsonl").read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines[1:]] == ["ig-0", "ig-1"]  # the first batch survived
    # a crash mid-write leaves a torn last line: it is cut off on resume
    with open(tmp_path / "cut" / "rollouts.jsonl", "a") as f:
        f.write('{"key": "ig-3", "task": "image_gen')
    fake = FakeGenerate(CANNED)
    rep, _ = run(bundle, src, tmp_path / "cut", monkeypatch, fake=fake, batch_size=2, keep="all")
    assert sorted(fake.keys) == ["ig-3", "iu-0", "iu-1"]  # done keys were not generated again
    assert rep.resumed == 2 and rep.generated == 3
    assert _outputs(tmp_path / "cut") == _outputs(tmp_path / "full")
    # other sampling settings cannot resume into the same rollouts
    with pytest.raises(UrtError, match="cannot resume.*temperature"):
        run(bundle, src, tmp_path / "cut", monkeypatch, batch_size=2, temperature=0.5)
    # resume=False starts over
    fake = FakeGenerate(CANNED)
    rep, _ = run(bundle, src, tmp_path / "cut", monkeypatch, fake=fake, temperature=0.5, resume=False)
    assert len(fake.keys) == 5 and rep.resumed == 0


def test_overlong_tasks_and_bad_args(bundle, src, tmp_path, monkeypatch):
    rep, fake = run(bundle, src, tmp_path / "o", monkeypatch, max_length=20)
    assert fake.keys == [] and rep.summary["total"]["pairs"] == 0
    assert rep.summary["total"]["skipped"] == {"overlong": 5, "tie": 1}
    assert read_index(rep.sft_dir)["total"] == 0 and read_index(rep.grpo_dir)["total"] == 0
    with pytest.raises(OverlongSample):
        run(bundle, src, tmp_path / "o2", monkeypatch, max_length=20, on_error="raise")
    rep, fake = run(bundle, src, tmp_path / "o3", monkeypatch, tasks=[IU])
    assert sorted(fake.keys) == ["iu-0", "iu-1"] and list(rep.summary["tasks"]) == [IG, IU]
    assert rep.summary["tasks"][IG]["skipped"] == {"other_task": 4} and rep.summary["tasks"][IG]["pairs"] == 0
    for bad in (dict(keep="best"), dict(order="both"), dict(k=0), dict(temperature=0.0, k=2), dict(tasks=["x"]),
                dict(top_p=0.0)):
        with pytest.raises(UrtError):
            run(bundle, src, tmp_path / "bad", monkeypatch, **bad)


def test_config_composes():
    from urt.stages.cli import compose_sample_config

    cfg = compose_sample_config(["sample.k=2", "model=tiny_qwen3_vl", "paths.root=/x"])
    s = cfg.sample
    assert s.k == 2 and s.out_dir == "/x/data/rejection_sampling/qwen3_vl" and s.seed == cfg.seed
    assert s.keep == "first" and s.order == "keep" and s.read.max_pixels == cfg.data.max_pixels
    import inspect

    params = inspect.signature(rejection_sample).parameters
    assert set(OmegaConf.to_container(s)) <= set(params)


def test_cli_end_to_end_real_generate(src, tmp_path, monkeypatch, capsys):
    """The real tiny model through `urt sample`: its random traces are all wrong, so one correct
    rollout is seeded into rollouts.jsonl first (resume path) to get both outputs non-empty."""
    import urt.cli

    out = tmp_path / "rs"
    out.mkdir()
    settings = {"k": 2, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "seed": 0, "order": "keep",
                "template_set": default_template_set("qwen2_5_vl"), "family": "qwen2_5_vl"}
    seeded = {"key": "iu-0", "task": IU, "label": 2, "swapped": False,
              "completions": [good(A(IU, 1), 0), good(A(IU, 2), 1)],
              "rewards": {"format": [1.0, 1.0], "accuracy": [0.0, 1.0]}, "correct": [False, True], "lengths": [9, 9]}
    (out / "rollouts.jsonl").write_text(json.dumps({"urt_rollouts": 1, "settings": settings}) + "\n"
                                        + json.dumps(seeded) + "\n")
    rc = urt.cli.main(["sample", "--quiet", "model=tiny_qwen2_5_vl", f"sample.shards={src}", f"sample.out_dir={out}",
                       "sample.k=2", "sample.max_new_tokens=8", "sample.batch_size=4"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out / "sft") in printed and str(out / "grpo") in printed
    assert {p.name for p in out.iterdir()} >= {"rollouts.jsonl", "summary.json", "sft", "grpo"}
    recs = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()[1:]]
    assert sorted(r["key"] for r in recs) == ["ig-0", "ig-1", "ig-3", "iu-0", "iu-1"]
    for r in recs:
        assert len(r["completions"]) == 2 and all(isinstance(c, str) for c in r["completions"])
        assert len(r["lengths"]) == 2
        if r["key"] == seeded["key"]:  # the record the test wrote (resumed, not generated)
            continue
        # generated now: lengths count the sampled tokens (stop token included), at most max_new_tokens
        assert all(isinstance(n, int) and 1 <= n <= 8 for n in r["lengths"])
        assert all(n == 8 for n, cut in zip(r["lengths"], r["truncated"]) if cut)
    summ = json.loads((out / "summary.json").read_text())
    assert summ["run"] == {"generated": 4, "resumed": 1, "stale_records": 0}
    sft, grpo = shard_samples(out / "sft"), shard_samples(out / "grpo")
    assert [s.key for s in sft] == ["iu-0"] and sft[0].cot == seeded["completions"][1]
    n_sft = summ["total"]["sft_pairs"]
    assert n_sft >= 1 and len(sft) == n_sft and len(grpo) == summ["total"]["grpo_pairs"] == 5 - n_sft
    assert all(s.cot is None for s in grpo)
