"""The demo: its data from easy-vqa (all four tasks, split by image), the report, and `urt demo demo=smoke`."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from urt.data.schema import TASKS, Video
from urt.demo.data import COLORS, SHAPES, build_demo_data, demo_samples, image_attributes, moving_clip, split_data
from urt.demo.report import build_report, checks, markdown, plot
from urt.errors import UrtError


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: one thread beats two on 2 cores


def test_attributes_come_from_the_images_own_qa_pairs():
    attrs, skipped = image_attributes("test")
    paths, qa = split_data("test")
    assert len(attrs) + sum(skipped.values()) == len(paths)
    assert len(attrs) > 600
    for q, a, i in qa:
        if i in attrs and q == "what color is the shape?":
            assert attrs[i]["color"] == a
        if i in attrs and q == "what shape is in the image?":
            assert attrs[i]["shape"] == a
    assert {a["color"] for a in attrs.values()} == set(COLORS)
    assert {a["shape"] for a in attrs.values()} == set(SHAPES)


def _centroid(img) -> np.ndarray:
    a = np.asarray(img).astype(int)
    fg = np.abs(a - a[0, 0]).sum(-1) > 60
    ys, xs = np.nonzero(fg)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("direction,axis,sign", [("left", 0, -1), ("right", 0, 1), ("up", 1, -1), ("down", 1, 1)])
def test_clip_moves_the_shape_in_its_direction(direction, axis, sign):
    from urt.demo.data import load_image

    attrs, _ = image_attributes("train")
    img = load_image("train", sorted(attrs)[3])
    frames = moving_clip(img, direction, frames=4, step=6)
    c = [_centroid(f) for f in frames]
    moves = [sign * (c[k + 1][axis] - c[k][axis]) for k in range(3)]
    assert all(m > 3 for m in moves), moves
    assert all(abs(c[k + 1][1 - axis] - c[k][1 - axis]) < 1.5 for k in range(3))
    with pytest.raises(UrtError, match="direction"):
        moving_clip(img, "sideways")


def test_pairs_of_every_task_are_consistent_and_position_balanced():
    samples = list(demo_samples("train", 40, seed=3))
    by_task = Counter(s.task for s in samples)
    assert by_task == {t: 40 for t in TASKS}
    assert 0.35 < sum(s.label == 1 for s in samples) / len(samples) < 0.65
    for s in samples:
        at = s.meta["attributes"]
        if s.task.endswith("generation"):
            good, bad = at["candidates"][s.label - 1], at["candidates"][2 - s.label]
            assert good == at["asks"] and bad != at["asks"]
            assert s.caption.startswith(f"a {at['asks']['color']} {at['asks']['shape']}")
            assert len(s.visuals) == 2
        else:
            seen, right = at["seen"], s.answers[s.label - 1]
            wrong = s.answers[2 - s.label]
            assert right != wrong
            if right in COLORS:
                assert right == seen["color"]
            elif right in SHAPES:
                assert right == seen["shape"]
            assert "not" not in s.question.split()  # negated easy-vqa questions are left out
        if s.task.startswith("video"):
            assert all(isinstance(v, Video) and len(v.frames) == 4 and v.frames[0].size == (84, 84) for v in s.visuals)
        else:
            assert all(v.size == (112, 112) for v in s.visuals)


def test_test_pairs_use_only_test_images():
    train_ids = set(image_attributes("train")[0])
    test_ids = set(image_attributes("test")[0])
    for s in demo_samples("test", 30):
        assert set(s.meta["image_ids"]) <= test_ids
    # easy-vqa numbers each split's images from 0: the split is what keeps them apart
    assert all(s.source == "easy-vqa/test" for s in demo_samples("test", 5))
    assert train_ids and test_ids


def test_build_writes_shards_and_reuses_a_finished_build(tmp_path):
    from urt.data.shards import read_shards

    s1 = build_demo_data(tmp_path, train_per_task=3, test_per_task=2, progress=False)
    assert s1["splits"]["train"]["tasks"] == {t: 3 for t in TASKS}
    got = list(read_shards(tmp_path / "test"))
    assert len(got) == 8 and {s.task for s in got} == set(TASKS)
    mtime = (tmp_path / "train" / "demo-000000.tar").stat().st_mtime_ns
    assert build_demo_data(tmp_path, train_per_task=3, test_per_task=2, progress=False) == s1
    assert (tmp_path / "train" / "demo-000000.tar").stat().st_mtime_ns == mtime
    with pytest.raises(UrtError, match="other settings"):
        build_demo_data(tmp_path, train_per_task=4, test_per_task=2, progress=False)


def test_rule_teacher_cot_agrees_with_the_label_on_demo_pairs():
    from urt.prompts import answer_string, parse_output
    from urt.stages.distill import RuleTeacher

    t, chain = RuleTeacher(dimensions=1), RuleTeacher(style="chain")
    for s in demo_samples("train", 10):
        cot = t.write(s)
        j = parse_output(cot, s.task)
        assert j.format_ok and j.answer == answer_string(s.task, s.label)
        assert cot.count("/10)") == 2  # one dimension: two scores
        assert "shows a" in cot
        # the grounding target is the chain (the cold start's CoT without tags), for both orders: every check
        # agrees with its two words, and the answer follows candidate 2's verdict
        text = chain.write(s)
        assert text == f"<think>\n{s.meta['describe']}\n</think>\n<answer>{answer_string(s.task, s.label)}</answer>"
        for describe, label in ((s.meta["describe"], s.label), (s.meta["describe_swapped"], 3 - s.label)):
            checks = re.findall(r"(\w+) vs (\w+) (yes|no)", describe)
            assert checks and all((a == b) == (v == "yes") for a, b, v in checks), describe
            last = describe.split("\n")[-1]
            assert last.endswith(("matches.", " fits.") if label == 2 else ("does not match.", "does not fit."))


def test_questions_say_what_they_ask_and_replay_pairs_are_marked(tmp_path):
    from urt.data.shards import read_shards
    from urt.demo.data import _understanding_attributes

    seen = {"color": "red", "shape": "circle"}
    assert _understanding_attributes("what is the red shape?", "circle", seen) == {"seen": seen, "asks": "shape"}
    assert _understanding_attributes("what color is the circle?", "red", seen)["asks"] == "color"
    assert _understanding_attributes("is there a blue shape?", "no", seen) == {"seen": seen, "asks": "color",
                                                                             "asks_value": "blue"}
    assert _understanding_attributes("does the image contain a triangle?", "no", seen)["asks_value"] == "triangle"
    summary = build_demo_data(tmp_path, train_per_task=2, test_per_task=1, replay_per_task=1,
                              direct_replay_per_task=1, progress=False)
    assert summary["splits"]["replay"]["tasks"] == {t: 1 for t in TASKS}
    assert summary["splits"]["replay_direct"]["tasks"] == {t: 1 for t in TASKS}
    train, replay = list(read_shards(tmp_path / "train")), list(read_shards(tmp_path / "replay"))
    direct = list(read_shards(tmp_path / "replay_direct"))
    assert {s.meta.get("target") for s in replay} == {"reason"} and all("target" not in s.meta for s in train)
    assert all(s.meta["target"] == "answer" and s.meta["template_set"] == "implicit" for s in direct)
    assert not {s.key for s in train} & {s.key for s in replay}
    # the base's own pairs again: the first train pair of each task, same visuals, now marked
    assert [s.key for s in direct] == [s.key for s in train[:4]]
    assert all(np.array_equal(np.asarray(d.visuals[0] if not isinstance(d.visuals[0], Video) else d.visuals[0].frames[0]),
                              np.asarray(t.visuals[0] if not isinstance(t.visuals[0], Video) else t.visuals[0].frames[0]))
               for d, t in zip(direct, train))
    with pytest.raises(UrtError, match="direct_replay_per_task must be >= 0"):
        build_demo_data(tmp_path / "x", train_per_task=2, test_per_task=1, direct_replay_per_task=-1)
    with pytest.raises(UrtError, match=r"direct_replay_per_task \(3\) replays train pairs: at most train_per_task \(2\)"):
        build_demo_data(tmp_path / "y", train_per_task=2, test_per_task=1, direct_replay_per_task=3)


def test_instructed_replay_pairs_vary_the_instruction_but_keep_the_tag_cue(tmp_path):
    """`instructed_share` of the replayed grounding pairs are prompted by a varied instruction (rubric lines of the
    implicit prompts, a tag instruction somewhere in it, the request last or anywhere) before the paper prompts' field lines;
    they encode to the grounding chain, and the tag instruction is the only thing the implicit prompts lack."""
    from urt.data.encode import SampleEncoder
    from urt.data.shards import read_shards
    from urt.demo.data import _REQUESTS, _TAG_ASKS, _rubric_lines
    from urt.models import build_tiny

    build_demo_data(tmp_path, train_per_task=2, test_per_task=1, replay_per_task=8, instructed_share=0.5,
                    progress=False)
    replay = list(read_shards(tmp_path / "replay"))
    instructed = [s for s in replay if "preamble" in s.meta]
    assert 0 < len(instructed) < len(replay)
    assert all(s.meta["template_set"] == "fields" and s.meta["target"] == "reason" for s in instructed)
    assert all("template_set" not in s.meta for s in replay if s not in instructed)
    rubric = set(_rubric_lines())
    assert not any("<think>" in line for line in rubric)
    lengths, request_last = set(), set()
    for s in instructed:
        lines = s.meta["preamble"].rstrip("\n").split("\n")
        assert lines.count(_REQUESTS[s.task]) == 1 and sum(line in _TAG_ASKS for line in lines) == 1
        assert all(line in rubric for line in lines if line not in _TAG_ASKS and line != _REQUESTS[s.task])
        lengths.add(len(lines))
        request_last.add(lines[-1] == _REQUESTS[s.task])
    assert len(lengths) > 1
    assert request_last == {True, False}  # the request is not a fixed ending either (the paper prompts lack it)
    b = build_tiny("qwen2_5_vl")
    s = instructed[0]
    e = SampleEncoder(b.processor, "qwen2_5_vl", target="answer", template_set="implicit")(s)
    prompt = b.tokenizer.decode(e.input_ids[: e.prompt_length])
    assert s.meta["preamble"] in prompt and ("Text Caption: [" in prompt or "Answer 2: " in prompt)
    assert b.tokenizer.decode(e.input_ids[e.labels != -100]).startswith(f"<think>\n{s.meta['describe']}\n</think>")
    # same settings, same data: the build is reused; another share is another build
    assert build_demo_data(tmp_path, train_per_task=2, test_per_task=1, replay_per_task=8, instructed_share=0.5,
                           progress=False)["settings"]["instructed_share"] == 0.5
    with pytest.raises(UrtError, match="other settings"):
        build_demo_data(tmp_path, train_per_task=2, test_per_task=1, replay_per_task=8, instructed_share=0.25,
                        progress=False)
    with pytest.raises(UrtError, match="instructed_share .* between 0 and 1, got 1.5"):
        build_demo_data(tmp_path / "z", train_per_task=2, test_per_task=1, instructed_share=1.5)


def test_instructed_replay_format_examples(tmp_path):
    """`example_share` of the instructed preambles hold a format example (placeholder scores and totals for
    both candidates, a verdict in tags) among the rubric lines, named with the task's candidate noun; the
    target is still the grounding chain, which reads the candidates from the field lines."""
    import random

    from urt.data.shards import read_shards
    from urt.demo.data import _REQUESTS, _TAG_ASKS, _rubric_lines, example_block
    from urt.prompts import parse_output

    block = example_block("image_understanding", random.Random(3))
    assert block[:2] == ["Example format:", "<think>"] and block[-2] == "</think>"
    totals = [line for line in block if line.startswith("Answer 1: ") or line.startswith("Answer 2: ")]
    assert len(totals) == 2 and all(sum(map(int, t.split(": ")[1].split("=")[0].split("+"))) == int(t.split("=")[1])
                                for t in totals)
    assert parse_output("\n".join(block[1:]), "image_understanding").format_ok
    assert all("Video" in line for line in example_block("video_generation", random.Random(0))[2:-5])

    build_demo_data(tmp_path, train_per_task=2, test_per_task=1, replay_per_task=8, instructed_share=1.0,
                    example_share=1.0, progress=False)
    instructed = list(read_shards(tmp_path / "replay"))
    rubric = set(_rubric_lines())
    for s in instructed:
        assert s.meta["target"] == "reason" and s.meta["template_set"] == "fields"
        lines = s.meta["preamble"].rstrip("\n").split("\n")
        i = lines.index("Example format:")
        j = lines.index("</think>", i) + 2
        noun = {"image_generation": "Image", "video_generation": "Video"}.get(s.task, "Answer")
        assert f"{noun} 1 (" in lines[i + 2] and lines[j - 1].startswith(f"<answer>{noun} ")
        rest = lines[:i] + lines[j:]
        assert rest.count(_REQUESTS[s.task]) == 1 and sum(line in _TAG_ASKS for line in rest) == 1
        assert all(line in rubric for line in rest if line not in _TAG_ASKS and line != _REQUESTS[s.task])
    with pytest.raises(UrtError, match="example_share .* between 0 and 1, got -0.5"):
        build_demo_data(tmp_path / "z", train_per_task=2, test_per_task=1, example_share=-0.5)


def _stage(acc, fmt=1.0):
    return {"overall": acc, "format_rate": fmt, "answer_1_rate": 0.5, "gold_1_rate": 0.5,
            "tasks": {t: acc for t in TASKS}}


def _results(accs):
    return {"stages": {name: {**_stage(a), "modes": {"cot": {"shards": _stage(a)}, "implicit": {"shards": _stage(0.6)}}}
                       for name, a in accs.items()}}


def test_report_files_and_checks(tmp_path):
    grpo = tmp_path / "grpo" / "csv"
    grpo.mkdir(parents=True)
    (grpo / "metrics.csv").write_text("epoch,step,train/reward,train/rewards/accuracy,train/rewards/format\n"
                                      "0,0,1.0,0.25,0.75\n0,1,1.5,0.5,1.0\n")
    for d in ("base", "grpo"):
        (tmp_path / d).mkdir(exist_ok=True)
        (tmp_path / d / "DONE").write_text(json.dumps({"seconds": 12.5}))
    (tmp_path / "vision").mkdir()
    (tmp_path / "vision" / "vision.json").write_text(json.dumps(
        {"heldout_before": {"image_shape": 0.3}, "heldout_after": {"image_shape": 0.9}, "loss": [1.0]}))
    res = _results({"base": 0.0, "cold_start": 0.4, "rejection_sampling": 0.7, "grpo": 0.72})
    rep = build_report(tmp_path, res)
    assert rep["vision"] == {"heldout_before": {"image_shape": 0.3}, "heldout_after": {"image_shape": 0.9}}
    assert list(rep["stages"]) == ["base", "cold_start", "rejection_sampling", "grpo"]
    assert rep["stages"]["grpo"]["tasks"]["video_generation"] == 0.72
    assert rep["implicit"]["base"]["overall"] == 0.6
    assert rep["grpo_curve"] == [{"step": 1, "reward": 1.0, "accuracy": 0.25, "format": 0.75},
                                 {"step": 2, "reward": 1.5, "accuracy": 0.5, "format": 1.0}]
    assert rep["seconds"] == {"base": 12.5, "grpo": 12.5}
    assert rep["checks"] == {"rejection_sampling_above_cold_start": True, "grpo_at_or_above_rejection_sampling": True,
                             "format_rate_after_rejection_sampling_at_least_0.95": True,
                             "final_overall_at_least_0.80": False,
                             "grpo_above_rejection_sampling_mcnemar_p_below_0.05": None,
                             "grpo_more_sound_correct_than_rejection_sampling": None}
    md = markdown(rep)
    assert "| grpo | 72.0 | 100.0 |" in md and "final overall at least 0.80: NO" in md
    assert "image shape 30.0 -> 90.0" in md
    png = plot(rep, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert checks({"cold_start": _stage(0.5), "rejection_sampling": _stage(0.4)})[
        "rejection_sampling_above_cold_start"] is False


@pytest.mark.slow
def test_demo_smoke_end_to_end(tmp_path, capsys):
    from urt.cli import main

    assert main(["demo", "demo=smoke", f"paths.runs={tmp_path}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    path = Path(out[-1])
    assert path == tmp_path / "demo_smoke" / "report.json"
    rep = json.loads(path.read_text())
    assert set(rep["stages"]) == {"base", "cold_start", "rejection_sampling", "grpo"}
    for s in rep["stages"].values():
        assert set(s["tasks"]) == set(TASKS)
        assert 0.0 <= s["overall"] <= 1.0 and 0.0 <= s["format_rate"] <= 1.0
    assert set(rep["implicit"]) == set(rep["stages"])
    assert (path.parent / "report.md").is_file() and (path.parent / "report.png").is_file()
    assert len(rep["grpo_curve"]) == 2
    assert all(r.get("chain") is not None for r in rep["grpo_curve"])  # the demo's GRPO is paid the chain reward
    # every CoT judgement's chain checked against its sample: sound-correct + lucky-correct is the accuracy
    assert set(rep["soundness"]) == set(rep["stages"])
    for name, c in rep["soundness"].items():
        assert c["n"] == rep["stages"][name]["n"] == sum(c["kinds"].values())
        assert c["sound_correct"] + c["lucky_correct"] == round(rep["stages"][name]["overall"] * c["n"])
    assert all("sound_correct" in t for t in rep["transitions"].values())
    # each stage against the one before, on the same judgements: the flips account for the accuracies
    assert list(rep["transitions"]) == ["cold_start_vs_base", "rejection_sampling_vs_cold_start",
                                        "grpo_vs_rejection_sampling"]
    for k, t in rep["transitions"].items():
        after, before = k.split("_vs_")
        n = t["n"]
        assert n == rep["stages"][after]["n"] > 0
        assert round(rep["stages"][before]["overall"] * n) + t["gained"] - t["lost"] == round(
            rep["stages"][after]["overall"] * n)
        assert 0.0 < t["p_value"] <= 1.0
    assert "grpo vs rejection sampling: +" in "\n".join(out) and "McNemar" in (path.parent / "report.md").read_text()
    # a re-run skips every finished step and evaluation and writes the same table
    assert main(["demo", "demo=smoke", f"paths.runs={tmp_path}"]) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier: skipped") == 9
    assert json.loads(path.read_text())["stages"] == rep["stages"]


def test_demo_grpo_pays_the_chain_reward_and_the_ablation_does_not(tmp_path):
    """The demo's GRPO: format + accuracy + the demo's `chain` reward (registered by reward.imports); the
    paper_reward preset adds the outcome-only ablation from the same model and data, in the same directory."""
    from urt.config import compose_config
    from urt.demo.cli import demo_overrides
    from urt.pipeline.core import Pipeline

    def pipe(preset):
        ov = demo_overrides([f"demo={preset}", f"paths.runs={tmp_path}"])
        return Pipeline(compose_config(ov), ov)

    default, paper = pipe("default"), pipe("paper_reward")
    assert "grpo_paper_reward" not in default.steps and default.dir == paper.dir
    g, a = paper.compose("grpo"), paper.compose("grpo_paper_reward")
    assert dict(g.reward.weights) == {"format": 1.0, "accuracy": 1.0, "chain": 1.0}
    assert list(g.reward.imports) == ["urt.demo.chain"]
    assert dict(a.reward.weights) == {"format": 1.0, "accuracy": 1.0} and not a.reward.imports
    assert (a.model.name_or_path, a.data.train_shards) == (g.model.name_or_path, g.data.train_shards)
    assert a.trainer.max_steps == g.trainer.max_steps and a.optimizer.lr == g.optimizer.lr
    assert list(paper.p.eval.after)[-1] == "grpo_paper_reward"
    assert dict(pipe("smoke").compose("grpo").reward.weights) == dict(g.reward.weights)


def test_smoke_preset_trains_each_stage_on_the_default_layout(tmp_path):
    """CI runs only the smoke preset: its stages must batch as the default's do (packed rows under urt_varlen for
    the base, cold start and rejection sampling; padded grounding), and keep every correct trace."""
    from urt.config import compose_config
    from urt.demo.cli import demo_overrides
    from urt.pipeline.core import Pipeline

    def layouts(preset):
        ov = demo_overrides([f"demo={preset}", f"paths.runs={tmp_path}"])
        pipe = Pipeline(compose_config(ov), ov)
        out = {}
        for step in ("grounding", "base", "cold_start", "rejection_sampling"):
            c = pipe.compose(step)
            out[step] = (c.model.attn_implementation, c.data.collate)
        out["keep"] = pipe.compose("rs_sample").sample.keep
        return out

    default, smoke = layouts("default"), layouts("smoke")
    assert default == smoke
    assert default["cold_start"] == ("urt_varlen", "packed") and default["grounding"][1] == "padded"
    assert default["keep"] == "all"
