"""Templates, rendering and parsing (urt.prompts)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from urt.errors import UrtError
from urt.prompts import (
    ANSWER_STRINGS,
    FAMILIES,
    TASKS,
    TEMPLATE_SETS,
    TIE_STRINGS,
    ChatPrompt,
    answer_string,
    assistant_suffix,
    available_templates,
    default_template_set,
    load_template,
    parse_implicit,
    parse_output,
    render_chat,
    render_text,
    template_fields,
)
from urt.prompts import cli as prompts_cli
from urt.prompts.render import URT_AUTHORED

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "prompts"
PACKAGED = REPO / "urt" / "prompts" / "templates"
# The judging prompts (the `describe` and `reason` sets are urt's grounding prompts; tested on their own)
COMBOS = [(s, t) for s, ts in available_templates().items() for t in ts if s not in ("describe", "reason", "fields")]
COT_COMBOS = [(s, t) for s, t in COMBOS if s != "implicit"]

FIELDS = {"caption": "a red {cube} on a table", "question": "What is it?", "answer1": "A cube.", "answer2": "A ball."}


def _needed(s, t):
    return {k: FIELDS[k] for k in template_fields(s, t)}


# --- templates -------------------------------------------------------------------------------


def test_constants():
    assert TASKS == ("image_generation", "video_generation", "image_understanding", "video_understanding")
    assert TEMPLATE_SETS == ("paper", "qwen3", "implicit", "describe", "reason", "fields")
    assert {s for pair in ANSWER_STRINGS.values() for s in pair} == {
        "Image 1 is better", "Image 2 is better", "Video 1 is better", "Video 2 is better",
        "Answer 1 is better", "Answer 2 is better",
    }
    assert set(TIE_STRINGS.values()) == {"Both images are equally good", "Both videos are equally good"}
    assert len(COMBOS) == 12


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared reference prompts not available")
def test_templates_byte_exact_with_reference():
    ref = sorted(p.relative_to(REFERENCE) for p in REFERENCE.glob("*/*.txt"))
    ours = sorted(p.relative_to(PACKAGED) for p in PACKAGED.glob("*/*.txt"))
    assert ours == sorted(ref + [Path(s, f"{t}.txt") for s, t in URT_AUTHORED])
    for rel in ref:
        assert (PACKAGED / rel).read_bytes() == (REFERENCE / rel).read_bytes(), rel
        s, t = rel.parent.name, rel.stem
        assert load_template(s, t).encode("utf-8") == (REFERENCE / rel).read_bytes()


@pytest.mark.parametrize("s,t", COMBOS)
def test_templates_only_known_placeholders(s, t):
    # Any brace other than the four placeholders would break str.format.
    text = load_template(s, t)
    stripped = re.sub(r"\{(caption|question|answer1|answer2)\}", "", text)
    assert "{" not in stripped and "}" not in stripped
    expected = ("caption",) if t.endswith("_generation") else ("question", "answer1", "answer2")
    assert template_fields(s, t) == expected


def test_template_quirks_preserved():
    # Trailing bytes differ per template; rendering must not normalise them.
    assert load_template("paper", "image_generation").endswith("Text Caption: [{caption}]")
    assert load_template("paper", "video_understanding").endswith("Answer 2: {answer2}\n")
    assert load_template("qwen3", "image_generation").endswith("\n        ")
    # The qwen3 templates quote values in CJK corner brackets (U+300C/U+300D), not ASCII quotes.
    assert "\u300c{caption}\u300d" in load_template("qwen3", "image_generation")


def test_answer_string_and_default_set():
    assert answer_string("image_generation", 1) == "Image 1 is better"
    assert answer_string("video_generation", 2) == "Video 2 is better"
    assert answer_string("image_understanding", 2) == "Answer 2 is better"
    assert answer_string("video_understanding", 1) == "Answer 1 is better"
    for bad in (0, 3, "1", None, True, 1.5):
        with pytest.raises(UrtError, match="winner"):
            answer_string("image_generation", bad)
    with pytest.raises(UrtError, match="image_gen.*known tasks"):
        answer_string("image_gen", 1)
    assert [default_template_set(f) for f in FAMILIES] == ["paper", "paper", "qwen3", "qwen3"]
    with pytest.raises(UrtError, match="llava.*known families.*qwen3_5"):
        default_template_set("llava")


# --- render_text -------------------------------------------------------------------------------


@pytest.mark.parametrize("s,t", COMBOS)
def test_render_text_is_str_format(s, t):
    out = render_text(s, t, **FIELDS)  # extra fields are ignored
    assert out == load_template(s, t).format(**_needed(s, t))
    if t.endswith("_generation"):
        assert "a red {cube} on a table" in out  # values are not re-parsed


def test_render_text_errors():
    with pytest.raises(UrtError, match=r"paper/image_understanding\.txt.*\{answer1\}, \{answer2\}"):
        render_text("paper", "image_understanding", question="q")
    with pytest.raises(UrtError, match=r"\{caption\}"):
        render_text("qwen3", "video_generation", question="q")
    with pytest.raises(UrtError, match="'cot'.*paper, qwen3, implicit"):
        render_text("cot", "image_generation", caption="c")
    with pytest.raises(UrtError, match="'image'.*image_generation"):
        render_text("paper", "image", caption="c")
    # urt's own implicit video-understanding prompt (URT_AUTHORED) renders like the image one
    text = render_text("implicit", "video_understanding", question="q", answer1="a", answer2="b")
    assert text.startswith("You are given a video and a question") and "Answer 2: b" in text


def test_render_text_empty_string_is_a_value():
    assert render_text("paper", "image_generation", caption="").endswith("Text Caption: []")


@given(st.text(), st.text(), st.text())
@settings(max_examples=50, deadline=None)
def test_render_text_any_values(q, a1, a2):
    out = render_text("qwen3", "image_understanding", question=q, answer1=a1, answer2=a2)
    assert out == load_template("qwen3", "image_understanding").format(question=q, answer1=a1, answer2=a2)


# --- render_chat -------------------------------------------------------------------------------

SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"


def test_llava_image_pair_exact():
    p = render_chat("llava_onevision", "paper", "image_generation", fields={"caption": "c"}, visuals=["a.png", "b.png"])
    text = render_text("paper", "image_generation", caption="c")
    assert p.text == SYS + "<image>\n <image>\n" + text + "<|im_end|>\n<|im_start|>assistant\n"
    assert p.images == ["a.png", "b.png"] and p.videos == [] and p.messages is None
    assert p.user_text == text
    q = render_chat("llava_onevision", "paper", "image_generation", fields={"caption": "c"},
                    visuals=["a.png", "b.png"], add_generation_prompt=False)
    assert q.text == SYS + "<image>\n <image>\n" + text + "<|im_end|>\n"


def test_llava_single_image_and_videos():
    f = {"question": "q", "answer1": "a", "answer2": "b"}
    p = render_chat("llava_onevision", "paper", "image_understanding", fields=f, visuals=["x.jpg"])
    assert p.text.startswith(SYS + "<image>\nGiven a question")
    frames1, frames2 = [f"v1_{i}" for i in range(8)], [f"v2_{i}" for i in range(8)]
    p = render_chat("llava_onevision", "paper", "video_generation", fields={"caption": "c"}, visuals=[frames1, frames2])
    assert p.images == frames1 + frames2
    assert p.text == SYS + "<image>\n" * 16 + render_text("paper", "video_generation", caption="c") + \
        "<|im_end|>\n<|im_start|>assistant\n"
    p = render_chat("llava_onevision", "paper", "video_understanding", fields=f, visuals=[frames1[:3]])
    assert p.images == frames1[:3] and p.text.count("<image>") == 3


class FakeProcessor:
    """Records the call; renders a ChatML-ish text so the test can see what was passed."""

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False, **template_kwargs):
        self.calls.append((messages, tokenize, add_generation_prompt))
        parts = []
        for item in messages[0]["content"]:
            parts.append(f"<{item['type']}>" if item["type"] != "text" else item["text"])
        return "USER:" + "".join(parts) + ("ASSISTANT:" if add_generation_prompt else "")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_qwen_images(family):
    proc = FakeProcessor()
    s = default_template_set(family)
    p = render_chat(family, s, "image_generation", fields={"caption": "c"}, visuals=["a", "b"], processor=proc)
    text = render_text(s, "image_generation", caption="c")
    assert p.messages == [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}]}]
    assert p.images == ["a", "b"] and p.videos == []
    assert proc.calls == [(p.messages, False, True)]
    assert p.text == "USER:<image><image>" + text + "ASSISTANT:"
    # No processor: messages only, text left to the caller's processor.
    p2 = render_chat(family, s, "image_generation", fields={"caption": "c"}, visuals=["a", "b"], add_generation_prompt=False)
    assert p2.text is None and p2.messages == p.messages
    p3 = render_chat(family, s, "image_generation", fields={"caption": "c"}, visuals=["a", "b"], processor=proc,
                     add_generation_prompt=False)
    assert proc.calls[-1][2] is False and not p3.text.endswith("ASSISTANT:")


def test_qwen_videos():
    v1, v2 = list("abcdefgh"), list("ABCDEFGH")
    # qwen3 set: one video, first half video 1, second half video 2.
    p = render_chat("qwen3_vl", "qwen3", "video_generation", fields={"caption": "c"}, visuals=[v1, v2])
    assert p.videos == [v1 + v2] and p.images == []
    assert [i["type"] for i in p.messages[0]["content"]] == ["video", "text"]
    with pytest.raises(UrtError, match="same number of frames.*8 and 7"):
        render_chat("qwen3_vl", "qwen3", "video_generation", fields={"caption": "c"}, visuals=[v1, v2[:7]])
    # paper set: two video items.
    p = render_chat("qwen2_5_vl", "paper", "video_generation", fields={"caption": "c"}, visuals=[v1, v2[:7]])
    assert p.videos == [v1, v2[:7]]
    assert [i["type"] for i in p.messages[0]["content"]] == ["video", "video", "text"]
    f = {"question": "q", "answer1": "a", "answer2": "b"}
    p = render_chat("qwen3_5", "qwen3", "video_understanding", fields=f, visuals=[tuple(v1)])
    assert p.videos == [v1] and isinstance(p, ChatPrompt)


def test_render_chat_errors():
    c = {"caption": "c"}
    with pytest.raises(UrtError, match="'gpt'.*known families"):
        render_chat("gpt", "paper", "image_generation", fields=c, visuals=["a", "b"])
    with pytest.raises(UrtError, match="exactly 2 visual.*got 1"):
        render_chat("qwen2_5_vl", "paper", "image_generation", fields=c, visuals=["a"])
    with pytest.raises(UrtError, match="exactly 1 visual.*got 2"):
        render_chat("llava_onevision", "paper", "image_understanding",
                    fields={"question": "q", "answer1": "a", "answer2": "b"}, visuals=["a", "b"])
    with pytest.raises(UrtError, match="visual 2.*list of frames.*str"):
        render_chat("qwen3_vl", "qwen3", "video_generation", fields=c, visuals=[["f"], "clip.mp4"])
    with pytest.raises(UrtError, match="visual 1.*no frames"):
        render_chat("qwen3_vl", "paper", "video_generation", fields=c, visuals=[[], ["f"]])
    with pytest.raises(UrtError, match="visual 1.*must be an image.*list"):
        render_chat("qwen3_vl", "paper", "image_generation", fields=c, visuals=[["f"], "b"])
    with pytest.raises(UrtError, match="answer_1"):
        render_chat("qwen3_vl", "paper", "image_understanding", fields={"answer_1": "x"}, visuals=["a"])
    with pytest.raises(UrtError, match=r"\{caption\}"):
        render_chat("qwen3_vl", "paper", "image_generation", fields={}, visuals=["a", "b"])
    with pytest.raises(UrtError, match="visuals must be a list"):
        render_chat("qwen3_vl", "paper", "image_generation", fields=c, visuals="ab")


def test_assistant_suffix():
    for fam in FAMILIES:
        assert assistant_suffix(fam, "<think>x</think><answer>Image 1 is better</answer>") == \
            "<think>x</think><answer>Image 1 is better</answer><|im_end|>\n"
    with pytest.raises(UrtError, match="family"):
        assistant_suffix("llama", "x")
    p = render_chat("llava_onevision", "paper", "image_generation", fields={"caption": "c"}, visuals=["a", "b"])
    full = p.text + assistant_suffix("llava_onevision", "OUT")
    assert full.endswith("<|im_start|>assistant\nOUT<|im_end|>\n")


class ThinkingProcessor:
    """Like Qwen3.5-style templates: the generation prompt opens the think block."""

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False, **template_kwargs):
        text = "<|im_start|>user\n" + messages[0]["content"][-1]["text"] + "<|im_end|>\n"
        return text + ("<|im_start|>assistant\n<think>\n" if add_generation_prompt else "")


def test_assistant_prefix():
    f = {"caption": "c"}
    p = render_chat("qwen3_5", "qwen3", "image_generation", fields=f, visuals=["a", "b"], processor=ThinkingProcessor())
    assert p.assistant_prefix == "<think>\n"
    target = "<think>\n1. A: ...\n</think>\n<answer>Image 1 is better</answer>"
    assert p.full_completion(target[len("<think>\n"):]) == target
    full = p.text + assistant_suffix("qwen3_5", target, prefix=p.assistant_prefix)
    assert full.endswith("<|im_start|>assistant\n" + target + "<|im_end|>\n")
    with pytest.raises(UrtError, match="assistant prefix"):
        assistant_suffix("qwen3_5", "<answer>x</answer>", prefix=p.assistant_prefix)
    # No generation prompt, no processor, or a plain ChatML template: no prefix.
    q = render_chat("qwen3_5", "qwen3", "image_generation", fields=f, visuals=["a", "b"], processor=ThinkingProcessor(),
                    add_generation_prompt=False)
    assert q.assistant_prefix == ""
    assert render_chat("qwen3_5", "qwen3", "image_generation", fields=f, visuals=["a", "b"]).assistant_prefix == ""
    assert render_chat("qwen2_5_vl", "paper", "image_generation", fields=f, visuals=["a", "b"],
                       processor=FakeProcessor()).assistant_prefix == ""


def test_pil_images_pass_through():
    Image = pytest.importorskip("PIL.Image")
    a, b = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4), (255, 0, 0))
    p = render_chat("qwen3_vl", "qwen3", "image_generation", fields={"caption": "c"}, visuals=[a, b])
    assert p.images[0] is a and p.images[1] is b


# --- parsing ----------------------------------------------------------------------------------


def _example(s, t):
    """The example judgement embedded in a CoT template."""
    text = load_template(s, t)
    start = text.rindex("<think>\n")  # the instructions mention the tags before the example
    return text[start: text.index("</answer>", start) + len("</answer>")]


@pytest.mark.parametrize("s,t", COT_COMBOS)
def test_parse_template_examples(s, t):
    j = parse_output(_example(s, t))
    assert j.format_ok and j.winner == 1 and j.answer == answer_string(t, 1)
    assert len(j.dimensions) >= 4
    # The example's dimension scores add up to its totals: the parser read every score.
    assert sum(d[1] for d in j.dimensions) == j.totals[1]
    assert sum(d[2] for d in j.dimensions) == j.totals[2]
    assert j.totals[1] > j.totals[2]


def test_parse_paper_example_exact():
    j = parse_output(_example("paper", "image_generation"))
    assert j.dimensions == (
        ("Semantic consistency", 9, 7),
        ("Aesthetics", 8, 8),  # written "Image 2 first"
        ("Authenticity", 8, 5),
        ("[Additional dimensions if any]", 6, 8),
    )
    assert j.totals == {1: 31, 2: 28}
    j = parse_output(_example("qwen3", "image_generation"))
    assert j.dimensions[0] == ("Semantic consistency", 9, 7) and len(j.dimensions) == 5
    assert j.totals == {1: 38, 2: 35}


def test_parse_qwen3_layout_image2_first_and_noise():
    text = (
        "<think>\nLet me look: both are fine.\n"
        "1. **Lighting**: \n    Image 2 (6/10) - flat: dull; \n    Image 1 (8/10) - the total score is not here\n"
        "2. Detail:\n  Image 1 (7.5/10) - ok; \n  Image 2 (7/10) - ok\n"
        "3. Broken: Image 1 (5/10) - only one score\n"
        "Total score:\nImage 1: 8+7.5=15.5\nImage 2: 6 + 7 = 13\n</think>\n<answer> Image 1 is better </answer>"
    )
    j = parse_output(text)
    assert j.dimensions == (("Lighting", 8, 6), ("Detail", 7.5, 7))
    assert j.totals == {1: 15.5, 2: 13}
    assert j.answer == "Image 1 is better" and j.winner == 1 and j.format_ok


def test_parse_inline_colon_scores():
    # The paper prompt's own inline example writes "Image 1: 8/10".
    t = "<think>1. Realism: Image 1: 8/10, Image 2: 6/10 - why\n2. Color: Video 2 - 5/10; Video 1 - 7/10\n</think>"
    assert parse_output(t).dimensions == (("Realism", 8, 6), ("Color", 7, 5))
    assert parse_output("<think>1. X: Image 1: 8/100, Image 2: 6/10</think>").dimensions == ()


def test_parse_fields():
    j = parse_output("<think>a</think> <answer>Video 2 is better.</answer> trailing")
    assert (j.think, j.answer, j.winner, j.format_ok) == ("a", "Video 2 is better.", 2, True)
    assert j.dimensions == () and j.totals == {}
    j = parse_output("x<think>a</think><answer>Answer 1 is better</answer>")
    assert not j.format_ok and j.winner == 1
    assert parse_output("<think>a</think><answer>image 1 is better</answer>").winner is None
    assert parse_output("<answer>Both images are equally good</answer>").winner == "tie"
    assert parse_output("<think>a</think><answer>Image 1 is better</answer>", task="video_generation").winner is None
    assert parse_output("<think>unclosed <answer>Image 1 is better").answer is None
    j = parse_output("<think>t</think><answer>Image 2 is better</answer><answer>Image 1 is better</answer>")
    assert j.winner == 2  # first tag wins, as in the accuracy reward
    assert parse_output(None).winner is None


def test_parse_totals_variants():
    t = "<think>\n**Total score:**\n- Image 1: 31\n- Image 2: 9+8+8+6(+1)=32\n</think><answer>Image 2 is better</answer>"
    assert parse_output(t).totals == {1: 31, 2: 32}
    t = "<think>Total scores: Image 1: 9+8=17, Image 2: 7+8=15</think>"
    assert parse_output(t).totals == {1: 17, 2: 15}
    # An unfinished sum has no total.
    assert parse_output("<think>Total score:\nImage 1: 9+8\n</think>").totals == {}
    assert parse_output("<think>Image 1: 9+8=17\nImage 2: 7=7</think>").totals == {}  # no section


def test_parse_implicit():
    assert parse_implicit("Image 1 is better.").winner == 1
    assert parse_implicit("  Answer 2 is better\n").winner == 2
    assert parse_implicit("Both videos are equally good.").winner == "tie"
    assert parse_implicit("Both videos are equally good.", task="image_generation").winner is None
    assert parse_implicit("<answer>Video 1 is better</answer>").winner == 1
    # No substring matching: an output mentioning both candidates is not an answer.
    assert parse_implicit("Image 1 is better than Image 2 is better").winner is None
    assert parse_implicit("I think Image 1 is better.").winner is None
    assert parse_implicit("").winner is None


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_parsers_never_raise(text):
    for fn in (parse_output, parse_implicit):
        j = fn(text)
        assert j.winner in (1, 2, "tie", None)
        assert isinstance(j.totals, dict) and isinstance(j.dimensions, tuple)


_piece = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "Total score:", "Image 1: 3+4=7",
                          "Image 2 (5/10)", "Image 1 (9/10)", "1. Foo:", "\n", " ", "=", "(", "/10)",
                          "Image 1 is better", "."]) | st.text(max_size=5)


@given(st.lists(_piece, max_size=25).map("".join))
@settings(max_examples=300, deadline=None)
def test_parsers_never_raise_on_tag_soup(text):
    j = parse_output(text)
    assert j.format_ok == (re.match(r"<think>.*?</think>\s*<answer>.*?</answer>", text, re.DOTALL) is not None)
    parse_implicit(text)


_name = st.text(alphabet="abcdefghij XYZ", min_size=1, max_size=12).map(str.strip).filter(bool)
_score = st.integers(1, 10)


@given(st.lists(st.tuples(_name, _score, _score, st.booleans(), st.booleans()), min_size=1, max_size=5),
       st.sampled_from(["Image", "Video", "Answer"]))
@settings(max_examples=150, deadline=None)
def test_parse_generated_cot_roundtrip(dims, label):
    lines = []
    for i, (name, s1, s2, swap, multiline) in enumerate(dims, 1):
        a, b = f"{label} 1 ({s1}/10) - r", f"{label} 2 ({s2}/10) - r"
        if swap:
            a, b = b, a
        lines.append(f"{i}. {name}: \n    {a}; \n    {b}" if multiline else f"{i}. {name}: {a}; {b}")
    t1, t2 = sum(d[1] for d in dims), sum(d[2] for d in dims)
    lines += ["Total score:", f"{label} 1: {'+'.join(str(d[1]) for d in dims)}={t1}",
              f"{label} 2: {'+'.join(str(d[2]) for d in dims)}={t2}"]
    text = "<think>\n" + "\n".join(lines) + "\n</think>\n<answer>" + f"{label} 1 is better</answer>"
    j = parse_output(text)
    assert j.dimensions == tuple((n, s1, s2) for n, s1, s2, _, _ in dims)
    assert j.totals == {1: t1, 2: t2}
    assert j.winner == 1 and j.format_ok


# --- CLI --------------------------------------------------------------------------------------


def _parser():
    p = argparse.ArgumentParser(prog="urt")
    prompts_cli.register(p.add_subparsers(dest="command", required=True))
    return p


def _run(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("s,t", COMBOS)
def test_cli_render_byte_exact(s, t, capsysbinary):
    argv = ["prompts", "render", "--set", s, "--task", t]
    for k, v in _needed(s, t).items():
        argv += [f"--{k}", v]
    assert _run(argv) == 0
    out = capsysbinary.readouterr().out
    expected = load_template(s, t).format(**_needed(s, t))
    assert out == expected.encode("utf-8")
    if REFERENCE.is_dir() and (s, t) not in URT_AUTHORED:
        ref = (REFERENCE / s / f"{t}.txt").read_bytes().decode("utf-8").format(**_needed(s, t))
        assert out == ref.encode("utf-8")


def test_cli_render_errors(capsys):
    with pytest.raises(UrtError, match=r"\{answer1\}"):
        _run(["prompts", "render", "--task", "image_understanding", "--question", "q"])
    with pytest.raises(UrtError, match="caption"):
        _run(["prompts", "render", "--set", "implicit", "--task", "video_generation", "--question", "q"])
    with pytest.raises(SystemExit):
        _run(["prompts", "render", "--set", "nope", "--task", "image_generation"])


def test_cli_list(capsys):
    assert _run(["prompts", "list"]) == 0
    out = capsys.readouterr().out
    for name in TEMPLATE_SETS + TASKS:
        assert name in out
    row = next(line for line in out.splitlines() if line.startswith("video_understanding"))
    assert row.split()[1:] == ["yes"] * len(TEMPLATE_SETS)


def _cli_importable():
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("urt.models.cli", "urt.config"))
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not _cli_importable(), reason="urt.cli's other layers are not written yet")
def test_urt_cli_subprocess_byte_exact(tmp_path):
    argv = ["prompts", "render", "--set", "qwen3", "--task", "image_understanding",
            "--question", "Q?", "--answer1", "A\nB", "--answer2", "{x}"]
    res = subprocess.run([sys.executable, "-m", "urt.cli", *argv], capture_output=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONIOENCODING": "ascii"}, timeout=120)
    assert res.returncode == 0, res.stderr
    expected = load_template("qwen3", "image_understanding").format(question="Q?", answer1="A\nB", answer2="{x}")
    assert res.stdout == expected.encode("utf-8")


# --- real processors (the tiny ones from urt.models; skipped while that layer is absent) --------


def _tiny_processor(family):
    try:
        from urt.models.tiny import tiny_processor
    except ImportError as err:  # pragma: no cover - depends on the models layer
        pytest.skip(f"urt.models.tiny not available: {err}")
    return tiny_processor(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_real_processor_accepts_rendered_prompt(family):
    np = pytest.importorskip("numpy")
    Image = pytest.importorskip("PIL.Image")
    proc = _tiny_processor(family)
    s = default_template_set(family)
    imgs = [Image.new("RGB", (64, 64), (200, 0, 0)), Image.new("RGB", (64, 64), (0, 200, 0))]
    p = render_chat(family, s, "image_generation", fields={"caption": "a cat"}, visuals=imgs, processor=proc)
    closed = "<think>\n\n</think>\n\n" if family == "qwen3_5" else ""  # Qwen3.5 renders without thinking, as served
    assert p.text.endswith("<|im_start|>assistant\n" + closed + p.assistant_prefix)
    assert render_text(s, "image_generation", caption="a cat") in p.text
    out = proc(text=[p.text], images=p.images, return_tensors="pt")
    assert out["input_ids"].shape[0] == 1 and "pixel_values" in out
    frames = [np.zeros((64, 64, 3), dtype=np.uint8) for _ in range(4)]
    p = render_chat(family, s, "video_generation", fields={"caption": "a cat"}, visuals=[frames, frames],
                    processor=proc)
    if family == "llava_onevision":
        assert len(p.images) == 8 and p.text.count("<image>") == 8
        out = proc(text=[p.text], images=p.images, return_tensors="pt")
    else:
        assert len(p.videos) == (1 if s == "qwen3" else 2)
        out = proc(text=[p.text], videos=p.videos, return_tensors="pt")
    assert out["input_ids"].shape[0] == 1


@pytest.mark.parametrize("task", TASKS)
def test_describe_prompts_render_and_encode_the_grounding_target(task):
    """urt's grounding prompts name the caption (or the question and answers) and ask to describe the
    visuals and say which candidate fits; SampleEncoder target 'describe' trains meta['describe']."""
    noun = "Video" if task.startswith("video") else "Image"
    if task.endswith("generation"):
        assert template_fields("describe", task) == ("caption",)
        assert render_text("describe", task, caption="a red circle") == (
            f"Describe {noun} 1 and {noun} 2. Which one shows [a red circle]?")
    else:
        assert template_fields("describe", task) == ("question", "answer1", "answer2")
        assert render_text("describe", task, question="what color is it?", answer1="red", answer2="blue") == (
            f"Describe the {noun.lower()}. Which answer fits the question [what color is it?]? "
            "Answer 1: [red] Answer 2: [blue]")
    # `reason`: the same prompt asking for the tags (the grounding prompt of the CPU demo)
    fields = ({"caption": "a red circle"} if task.endswith("generation") else
              {"question": "what color is it?", "answer1": "red", "answer2": "blue"})
    assert render_text("reason", task, **fields) == render_text("describe", task, **fields) + (
        " Reason inside <think> </think> tags, then give the answer inside <answer> </answer> tags.")


@pytest.mark.parametrize("task", TASKS)
def test_fields_are_the_paper_prompts_last_lines_after_a_samples_own_preamble(task):
    """The `fields` set is exactly how each paper prompt ends (its field lines, brackets and final newline as
    the paper prompt has them); `render_chat(preamble=...)` puts a sample's own instruction before them."""
    fields = ({"caption": "a red circle"} if task.endswith("generation") else
              {"question": "what color is it?", "answer1": "red", "answer2": "blue"})
    tail = render_text("fields", task, **fields)
    assert render_text("paper", task, **fields).endswith("\n" + tail)
    assert "<think>" not in tail and tail.count("\n") <= 3
    visuals = {"image_generation": ["a.png", "b.png"], "image_understanding": ["a.png"],
               "video_generation": [["a.png"] * 2, ["b.png"] * 2], "video_understanding": [["a.png"] * 2]}[task]
    p = render_chat("qwen2_5_vl", "fields", task, fields=fields, visuals=visuals, preamble="Reason in <think>.\n")
    assert p.user_text == "Reason in <think>.\n" + tail
    with pytest.raises(UrtError, match="preamble must be a string"):
        render_chat("qwen2_5_vl", "fields", task, fields=fields, visuals=visuals, preamble=None)
