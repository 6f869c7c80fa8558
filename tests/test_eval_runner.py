"""The eval runner end to end on a tiny random model: a shard set and a slice of the real VL-RewardBench
file, generations written in the predictions format, resume without regenerating."""

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from data_fixtures import mp4_bytes, vqa_image, vqa_question
from urt.data.schema import Sample
from urt.data.shards import write_shards
from urt.eval import read_predictions, score
from urt.eval.cli import register
from urt.eval.runner import swap_coin

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "benchmarks"
generation = pytest.importorskip("urt.generation")


@pytest.fixture(scope="module")
def bundle():
    from urt.models import load_model

    return load_model("tiny", "qwen2_5_vl", device="cpu")


@pytest.fixture
def counted(monkeypatch, bundle):
    """Count generate calls/prompts; every model load returns the one tiny bundle."""
    calls = []
    real = generation.generate

    def gen(b, prompts, cfg, **kw):
        calls.append(len(prompts))
        assert cfg.temperature == 0.0 and cfg.max_new_tokens == 8
        return real(b, prompts, cfg, **kw)

    monkeypatch.setattr(generation, "generate", gen)
    monkeypatch.setattr("urt.models.load_model", lambda *a, **k: bundle)
    return calls


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="urt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def gen_lines(out):
    return [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines() if x.strip()]


def test_runner_shards_resume(tmp_path, counted, monkeypatch):
    q, _, img = vqa_question(0)
    samples = [
        Sample("ig-0", "image_generation", 1, [vqa_image(1), vqa_image(2)], caption="a blue circle"),
        Sample("ig-1", "image_generation", "tie", [vqa_image(3), vqa_image(4)], caption="a red square"),
        Sample("iu-0", "image_understanding", 2, [img], question=q, answers=("yes", "no")),
    ]
    write_shards(samples, tmp_path / "shards")
    out = tmp_path / "res"
    monkeypatch.chdir(tmp_path)  # a relative --shards path: results.json records where it pointed
    argv = ["eval", "--model", "tiny", "--family", "qwen2_5_vl", "--shards", "shards",
            "--mode", "implicit", "--order", "both", "--max-new-tokens", "8", "--batch-size", "4",
            "--no-progress", "--out", str(out)]
    assert run_cli(argv) == 0
    assert calls_total(counted) == 6 and counted == [4, 2]
    lines = gen_lines(out)
    assert sorted((g["key"], g["swapped"]) for g in lines) == sorted(
        (s.key, sw) for s in samples for sw in (False, True))
    assert all(set(g) == {"key", "output", "swapped", "task"} and isinstance(g["output"], str) for g in lines)
    r = json.loads((out / "results.json").read_text())
    assert r["counts"]["judgements"] == 6 and r["complete"] and r["run"]["generated_now"] == 6
    assert r["position"]["consistency"]["pairs"] == 3
    assert r["shards"] == str(tmp_path.resolve() / "shards")
    assert "tau" in r["by_task"]["image_generation"]
    assert (out / "results.md").is_file()
    # generations.jsonl is a predictions file: re-scoring it gives the same numbers
    from urt.eval import load_shard_items

    again = score(load_shard_items(tmp_path / "shards"), read_predictions(out / "generations.jsonl"), mode="implicit")
    assert again["accuracy"] == r["accuracy"] and again["by_task"] == r["by_task"]

    # resume: nothing new is generated, results are rewritten
    (out / "results.json").unlink()
    assert run_cli(argv) == 0
    assert calls_total(counted) == 6
    r2 = json.loads((out / "results.json").read_text())
    assert r2["run"]["generated_now"] == 0 and r2["run"]["reused"] == 6 and r2["accuracy"] == r["accuracy"]

    # an interrupted run: the last line cut mid-write and one line lost -> only that one is regenerated
    text = (out / "generations.jsonl").read_text().splitlines(keepends=True)
    (out / "generations.jsonl").write_text("".join(text[:4]) + text[4][:10])
    assert run_cli(argv) == 0
    assert calls_total(counted) == 8  # lines 5 and 6
    assert len(gen_lines(out)) == 6

    # other settings on the same generations are refused
    from urt.errors import UrtError

    with pytest.raises(UrtError, match="max_new_tokens"):
        run_cli([a if a != "8" else "9" for a in argv])


def calls_total(calls):
    return sum(calls)


@pytest.mark.skipif(not (REF / "vl_rewardbench.json").is_file(), reason="reference benchmarks not present")
def test_runner_real_vl_rewardbench_slice(tmp_path, counted):
    raw = json.loads((REF / "vl_rewardbench.json").read_text())[:6]
    root = tmp_path / "media"
    for i, it in enumerate(raw):  # synthetic images at the paths the benchmark references
        p = root / it["image"]
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (56 + 8 * i, 56), (40 * i, 100, 200)).save(p)
    out = tmp_path / "res"
    argv = ["eval", "--model", "tiny", "--family", "qwen2_5_vl", "--benchmark", "vl_rewardbench",
            "--benchmark-file", str(REF / "vl_rewardbench.json"), "--root", str(root), "--limit", "6",
            "--seed", "3", "--max-new-tokens", "8", "--batch-size", "3", "--no-progress", "--out", str(out)]
    assert run_cli(argv) == 0
    assert sum(counted) == 6
    lines = gen_lines(out)
    assert [g["key"] for g in lines] == [it["id"] for it in raw]
    assert [g["swapped"] for g in lines] == [swap_coin(3, it["id"]) for it in raw]
    assert all(g["task"] == "image_understanding" for g in lines)
    r = json.loads((out / "results.json").read_text())
    assert r["counts"]["items"] == 6 and r["counts"]["missing"] == 0 and r["counts"]["judgements"] == 6
    assert r["benchmark"] == "vl_rewardbench" and set(r["vl_rewardbench"]) >= {"official", "official_script"}
    n_groups = sum(b["n"] for b in r["vl_rewardbench"]["official"]["groups"].values())
    assert n_groups == 6
    assert r["mode"] == "cot" and 0.0 <= r["accuracy"] <= 1.0
    # resume: nothing regenerated
    assert run_cli(argv) == 0
    assert sum(counted) == 6


def check_video_run(argv, out, counted, keys, votes):
    """A video-generation benchmark run with order=both: 2 judgements per item, tau/diff/by_vote and the
    position consistency block in results, nothing regenerated on a re-run."""
    assert run_cli(argv) == 0
    assert sum(counted) == 2 * len(keys)
    lines = gen_lines(out)
    assert len(lines) == 2 * len(keys)
    assert sorted((g["key"], g["swapped"]) for g in lines) == sorted((k, sw) for k in keys for sw in (False, True))
    assert all(g["task"] == "video_generation" and isinstance(g["output"], str) for g in lines)
    r = json.loads((out / "results.json").read_text())
    assert r["counts"]["items"] == len(keys) and r["counts"]["missing"] == 0 and r["complete"]
    assert r["counts"]["judgements"] == 2 * len(keys) and r["counts"]["orders"] == {"original": 3, "swapped": 3}
    assert r["mode"] == "cot" and r["tau"] is None and "tau_note" in r
    assert 0.0 <= r["diff"] <= 1.0  # non-tie items exist
    assert r["tau_diff_counts"]["all"] == 2 * len(keys)
    assert r["tau_diff_counts"]["non_tie"] == 2 * sum(v not in ("same", "tievote", "bothbad_vote") for v in votes)
    assert set(r["by_vote"]) == set(votes) and sum(b["n"] for b in r["by_vote"].values()) == 2 * len(keys)
    assert r["position"]["consistency"]["pairs"] == len(keys) and r["counts"]["both_orders"] == len(keys)
    assert r["by_task"]["video_generation"]["tau"] is None
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["frames"] == 4 and run_info["max_new_tokens"] == 8
    # resume: nothing regenerated, the same numbers
    assert run_cli(argv) == 0
    assert sum(counted) == 2 * len(keys)
    r2 = json.loads((out / "results.json").read_text())
    assert r2["run"]["generated_now"] == 0 and r2["run"]["reused"] == 2 * len(keys)
    assert r2["accuracy"] == r["accuracy"] and r2["by_vote"] == r["by_vote"]


def video_argv(benchmark, path, root, out):
    return ["eval", "--model", "tiny", "--family", "qwen2_5_vl", "--benchmark", benchmark,
            "--benchmark-file", str(path), "--root", str(root), "--limit", "3", "--order", "both",
            "--frames", "4", "--max-new-tokens", "8", "--batch-size", "4", "--no-progress", "--out", str(out)]


@pytest.mark.skipif(not (REF / "genai_bench_video.json").is_file(), reason="reference benchmarks not present")
def test_runner_real_genai_bench_video_slice(tmp_path, counted, torch_one_thread):
    raw = json.loads((REF / "genai_bench_video.json").read_text())[:3]
    root = tmp_path / "media"
    for i, it in enumerate(raw):  # synthetic videos at the paths the benchmark references
        for j, k in enumerate(("video_left", "video_right")):
            p = root / it[k]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(mp4_bytes(8, fps=8.0, size=(56, 56), seed=37 * i + 11 * j))
    out = tmp_path / "res"
    argv = video_argv("genai_bench_video", REF / "genai_bench_video.json", root, out)
    check_video_run(argv, out, counted, [str(it["id"]) for it in raw], [it["vote_type"] for it in raw])
    r = json.loads((out / "results.json").read_text())
    assert r["benchmark"] == "genai_bench_video"


def test_runner_videogen_rewardbench_jsonl(tmp_path, counted, torch_one_thread):
    rows = [{"prompt": "a cat surfing", "path_A": "a/0.mp4", "path_B": "b/0.mp4", "Overall": "A"},
            {"prompt": "a dog on the moon", "path_A": "a/1.mp4", "path_B": "b/1.mp4", "Overall": "B"},
            {"prompt": "rain over a city", "path_A": "a/2.mp4", "path_B": "b/2.mp4", "Overall": "same"}]
    root = tmp_path / "media"
    for i, row in enumerate(rows):
        for j, k in enumerate(("path_A", "path_B")):
            p = root / row[k]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(mp4_bytes(8, fps=8.0, size=(56, 56), seed=37 * i + 11 * j))
    bench = tmp_path / "videogen.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "res"
    argv = video_argv("videogen_rewardbench", bench, root, out)
    check_video_run(argv, out, counted, [f"videogen-{i:07d}" for i in range(3)], [r["Overall"] for r in rows])
    r = json.loads((out / "results.json").read_text())
    assert r["benchmark"] == "videogen_rewardbench"
    assert r["by_vote"]["same"]["n"] == 2
