"""urt.judge (Judge, Verdict) and `urt judge` (urt.judge.cli)."""

from __future__ import annotations

import argparse
import json

import pytest

import urt.judge.core as judge_mod
from data_fixtures import mp4_bytes, synthetic_frames, vqa_image
from urt.data.schema import Sample
from urt.errors import UrtError
from urt.generation import GenerationConfig
from urt.judge import Judge, Verdict, verdict_from_text
from urt.models import build_tiny
from urt.prompts import parse_output

COT_1 = (
    "<think>\n1. Semantic consistency: Image 1 (9/10) - matches; Image 2 (5/10) - wrong colour\n"
    "2. Aesthetics: Image 1 (7/10) - fine; Image 2 (8/10) - nicer\n"
    "Total score:\nImage 1: 9+7=16\nImage 2: 5+8=13\n</think>\n<answer>Image 1 is better</answer>"
)
# The same judgement written about the swapped pair (candidate 1 shown second).
COT_1_SWAPPED = (
    "<think>\n1. Semantic consistency: Image 1 (5/10) - wrong colour; Image 2 (9/10) - matches\n"
    "2. Aesthetics: Image 1 (8/10) - nicer; Image 2 (7/10) - fine\n"
    "Total score:\nImage 1: 5+8=13\nImage 2: 9+7=16\n</think>\n<answer>Image 2 is better</answer>"
)


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: one thread beats two on 2 cores



@pytest.fixture(scope="module")
def judge():
    return Judge(build_tiny("qwen2_5_vl", seed=0), generation=GenerationConfig(max_new_tokens=6), frames=4)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    paths = []
    for i in (1, 2):
        p = d / f"im{i}.png"
        vqa_image(i).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("vid")
    paths = []
    for seed in (0, 50):
        p = d / f"v{seed}.mp4"
        p.write_bytes(mp4_bytes(12, 6.0, seed=seed))
        paths.append(str(p))
    return paths


def _consistent(v: Verdict, task: str) -> None:
    assert isinstance(v, Verdict) and v.task == task and not v.swapped
    j = parse_output(v.text, task)
    assert v.winner == j.winner and v.format_ok == j.format_ok
    assert v.scores == j.dimensions and v.totals == j.totals


def test_compare_images(judge, images):
    v = judge.compare_images("a blue circle", *images)
    _consistent(v, "image_generation")
    from PIL import Image

    pil = [Image.open(p) for p in images]
    assert judge.compare_images("a blue circle", *pil) == v  # paths and PIL images give the same prompt


def test_compare_videos(judge, videos):
    v = judge.compare_videos("a moving square", *videos)
    _consistent(v, "video_generation")
    frames = judge.compare_videos("a moving square", synthetic_frames(4), synthetic_frames(4, seed=9))
    _consistent(frames, "video_generation")


def test_compare_answers(judge, images, videos):
    _consistent(judge.compare_answers("What shape?", "circle", "square", image=images[0]), "image_understanding")
    _consistent(judge.compare_answers("What moves?", "a square", "nothing", video=videos[0]), "video_understanding")
    with pytest.raises(UrtError, match="exactly one"):
        judge.compare_answers("q", "a", "b")
    with pytest.raises(UrtError, match="not found"):
        judge.compare_videos("c", "/nonexistent.mp4", videos[0])


def test_canned_cot_and_both_orders(judge, images, monkeypatch):
    calls = []

    def fake_generate(bundle, prompts, cfg, **kw):
        calls.append(prompts)
        texts = [[COT_1], [COT_1_SWAPPED]][: len(prompts)]
        if prompts[0].task == "image_understanding":
            texts = [[t[0].replace("Image", "Answer")] for t in texts]
        return texts

    monkeypatch.setattr(judge_mod, "generate", fake_generate)
    v = judge.compare_images("a blue circle", *images)
    assert v.winner == 1 and v.format_ok and v.text == COT_1 and not v.swapped
    assert v.scores == (("Semantic consistency", 9, 5), ("Aesthetics", 7, 8))
    assert v.totals == {1: 16, 2: 13}

    s = Sample("k", "image_understanding", 1, [vqa_image(0)], question="Which shape?",
               answers=("ANSWER-ONE", "ANSWER-TWO"))
    first, second = judge.judge([s], both_orders=True)
    assert not first.swapped and second.swapped
    assert first.winner == second.winner == 1  # the swapped verdict is mapped back
    assert second.scores == first.scores and second.totals == first.totals == {1: 16, 2: 13}
    assert second.text == COT_1_SWAPPED.replace("Image", "Answer") and second.format_ok
    # the second prompt really showed the answers in the other order
    tok = judge.bundle.tokenizer
    shown = [tok.decode(e.input_ids) for e in calls[-1]]
    assert shown[0].index("ANSWER-ONE") < shown[0].index("ANSWER-TWO")
    assert shown[1].index("ANSWER-TWO") < shown[1].index("ANSWER-ONE")


def test_verdict_parsing_edge_cases():
    v = verdict_from_text("no tags at all", "image_generation")
    assert v.winner is None and not v.format_ok and v.scores == () and v.totals == {}
    assert verdict_from_text("Both images are equally good.", "image_generation", mode="implicit").winner == "tie"
    tie = verdict_from_text("Both images are equally good", "image_generation", mode="implicit", swapped=True)
    assert tie.winner == "tie" and tie.swapped
    assert verdict_from_text("<think>x</think><answer>Video 1 is better</answer>", "image_generation").winner is None
    d = verdict_from_text(COT_1, "image_generation").to_dict()
    assert d["totals"] == {"1": 16, "2": 13} and d["scores"][0] == {"dimension": "Semantic consistency",
                                                                   "score1": 9, "score2": 5}
    json.dumps(d)


def test_implicit_mode(judge, images, monkeypatch):
    j = Judge(judge.bundle, mode="implicit", generation=GenerationConfig(max_new_tokens=4))
    assert j.template_set == "implicit"
    monkeypatch.setattr(judge_mod, "generate", lambda b, p, c, **k: [["Image 2 is better."]] * len(p))
    v = j.compare_images("c", *images)
    assert v.winner == 2 and not v.format_ok
    with pytest.raises(UrtError):
        Judge(judge.bundle, mode="pointwise")
    with pytest.raises(UrtError):
        Judge(judge.bundle, family="qwen3_vl")


def test_llava_onevision_tiny_judge(images):
    j = Judge("tiny", "llava_onevision", generation=GenerationConfig(max_new_tokens=6))
    assert j.family == "llava_onevision" and j.template_set == "paper"
    _consistent(j.compare_images("a blue circle", *images), "image_generation")


def _cli(argv):
    from urt.judge.cli import register

    parser = argparse.ArgumentParser(prog="urt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli(images, capsys):
    base = ["judge", "--model", "tiny", "--family", "qwen2_5_vl", "--max-new-tokens", "6"]
    assert _cli(base + ["--images", *images, "--caption", "a blue circle"]) == 0
    out = capsys.readouterr().out
    assert "winner:" in out and "model output" in out
    assert _cli(base + ["--question", "What?", "--answer1", "a", "--answer2", "b", "--image", images[0],
                        "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["task"] == "image_understanding" and data["family"] == "qwen2_5_vl"
    assert set(data) >= {"winner", "totals", "scores", "format_ok", "text", "swapped"}
    assert data["winner"] == parse_output(data["text"], "image_understanding").winner


def test_cli_canned_table(images, capsys, monkeypatch):
    monkeypatch.setattr(judge_mod, "generate", lambda b, p, c, **k: [[COT_1]] * len(p))
    assert _cli(["judge", "--images", *images, "--caption", "c", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "Semantic consistency" in out and "16" in out and "Image 1 is better" in out
    assert _cli(["judge", "--images", *images, "--caption", "c", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["winner"] == 1 and data["totals"] == {"1": 16, "2": 13}


def test_cli_bad_arguments(images):
    with pytest.raises(UrtError, match="caption"):
        _cli(["judge", "--images", *images])
    with pytest.raises(UrtError, match="exactly one"):
        _cli(["judge", "--images", *images, "--caption", "c", "--question", "q"])
    with pytest.raises(UrtError, match="answer"):
        _cli(["judge", "--question", "q", "--image", images[0]])
