"""GRPO rewards (urt.rewards), checked against docs/method.md §Rewards and an independent regex reference."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from urt.errors import UrtError
from urt.rewards import (
    DEFAULT_WEIGHTS,
    REWARDS,
    accuracy_reward,
    consistency_reward,
    format_reward,
    get_reward,
    register_reward,
    score,
)


def ref_format(text: str) -> float:
    # Written out here on purpose rather than imported: the paper's pattern, verbatim.
    return 1.0 if re.match(r"<think>.*?</think>\s*<answer>.*?</answer>", text, re.DOTALL) else 0.0


def ref_extract(text: str) -> str:
    m = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return m.group(1).strip() if m else text.strip()


GOOD = "<think>\n1. A: Image 1 (9/10); Image 2 (7/10)\nTotal score:\nImage 1: 9=9\nImage 2: 7=7\n</think>\n<answer>Image 1 is better</answer>"


@pytest.fixture
def clean_registry():
    saved = dict(REWARDS)
    yield
    REWARDS.clear()
    REWARDS.update(saved)


# --- format -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,want",
    [
        (GOOD, 1.0),
        ("<think></think><answer></answer>", 1.0),
        ("<think>a</think> \n\t <answer>b</answer> trailing text is fine", 1.0),
        ("<think>multi\nline\n</think><answer>x\ny</answer>", 1.0),
        (" <think>a</think><answer>b</answer>", 0.0),  # leading text (even a space) is not
        ("Sure! <think>a</think><answer>b</answer>", 0.0),
        ("<think>a</think>x<answer>b</answer>", 0.0),  # only whitespace between the blocks
        ("<THINK>a</THINK><ANSWER>b</ANSWER>", 0.0),  # case sensitive
        ("<think>a</think><answer>b", 0.0),  # unclosed answer
        ("<think>a<answer>b</answer>", 0.0),  # unclosed think
        ("<answer>b</answer><think>a</think>", 0.0),  # wrong order
        ("<think><think>a</think></think><answer>b</answer>", 1.0),  # nested: .*? backtracks past inner </think>
        ("<think>a</think></think><answer>b</answer>", 1.0),  # stray close tag is swallowed the same way
        ("<think>a</think><answer><answer>b</answer></answer>", 1.0),  # nested answer still matches
        ("<think>a</think><think>b</think><answer>c</answer>", 1.0),  # lazy .*? extends past first </think>
        ("", 0.0),
    ],
)
def test_format_reward_cases(text, want):
    assert format_reward(text) == want
    assert format_reward(text, "Image 1 is better") == want
    assert ref_format(text) == want


# --- accuracy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,label,want",
    [
        (GOOD, "Image 1 is better", 1.0),
        (GOOD, "Image 2 is better", 0.0),
        ("<answer>  Image 2 is better \n</answer>", "Image 2 is better", 1.0),  # answer stripped
        ("<answer>Image 2 is better</answer>", " Image 2 is better\n", 1.0),  # label stripped too
        ("<answer>Image 2 is better.</answer>", "Image 2 is better", 0.0),  # exact: no period
        ("<answer>image 2 is better</answer>", "Image 2 is better", 0.0),  # case sensitive
        ("<answer>Image  2 is better</answer>", "Image 2 is better", 0.0),  # inner whitespace counts
        ("<answer>Video 1\nis better</answer>", "Video 1\nis better", 1.0),  # DOTALL
        ("<answer>Answer 1 is better</answer><answer>Answer 2 is better</answer>", "Answer 1 is better", 1.0),
        ("<answer>Answer 1 is better</answer><answer>Answer 2 is better</answer>", "Answer 2 is better", 0.0),
        ("  Answer 1 is better  ", "Answer 1 is better", 1.0),  # no tag: whole completion compared
        ("The answer: Answer 1 is better", "Answer 1 is better", 0.0),  # no substring matching
        ("<answer>Image 1 is better", "Image 1 is better", 0.0),  # unclosed tag: whole text compared
        ("<Answer>Image 1 is better</Answer>", "Image 1 is better", 0.0),
        ("<answer><answer>Image 1 is better</answer></answer>", "Image 1 is better", 0.0),
        ("", "Image 1 is better", 0.0),
    ],
)
def test_accuracy_reward_cases(text, label, want):
    assert accuracy_reward(text, label) == want


@pytest.mark.parametrize("label", [None, "", "  \n", 3])
def test_accuracy_reward_bad_label(label):
    with pytest.raises(UrtError, match="label"):
        accuracy_reward(GOOD, label)


# --- consistency ------------------------------------------------------------------------------


def _cot(t1, t2, answer):
    totals = ""
    if t1 is not None:
        totals += f"Image 1: {t1}={t1}\n"
    if t2 is not None:
        totals += f"Image 2: {t2}={t2}\n"
    return f"<think>\n1. A: Image 1 (5/10); Image 2 (5/10)\nTotal score:\n{totals}</think>\n<answer>{answer}</answer>"


@pytest.mark.parametrize(
    "text,want",
    [
        (_cot(31, 28, "Image 1 is better"), 1.0),
        (_cot(28, 31, "Image 2 is better"), 1.0),
        (_cot(31, 28, "Image 2 is better"), 0.0),
        (_cot(30, 30, "Image 1 is better"), 0.0),  # tie in totals justifies neither answer
        (_cot(31, None, "Image 1 is better"), 0.0),
        (_cot(31, 28, "Image 1 is best"), 0.0),
        ("<think>Total score:\nImage 1: 3\nImage 2: 2\n</think>", 0.0),  # no answer
        ("Total score:\nImage 1: 3\nImage 2: 2\n<answer>Image 1 is better</answer>", 0.0),  # totals outside think
        (GOOD, 1.0),
        ("", 0.0),
    ],
)
def test_consistency_reward_cases(text, want):
    assert consistency_reward(text, "Image 2 is better") == want
    assert consistency_reward(text) == want


# --- accuracy_direct (direct answers under the implicit prompts) --------------------------------


@pytest.mark.parametrize("text,label,want", [
    ("Image 1 is better.", "Image 1 is better", 1.0),      # the implicit prompt's own example
    ("  Image 1 is better  ", "Image 1 is better", 1.0),
    ("Image 1 is better", "Image 1 is better.", 1.0),
    ("<answer>Video 2 is better.</answer>", "Video 2 is better", 1.0),
    ("Both images are equally good.", "Both images are equally good", 1.0),
    ("Image 1 is better..", "Image 1 is better", 0.0),     # one period, not any punctuation
    ("Image 2 is better.", "Image 1 is better", 0.0),
    ("image 1 is better.", "Image 1 is better", 0.0),      # case still counts
    ("Video 1 is better.", "Image 1 is better", 0.0),      # another task's string
    ("Image 1 is better. It shows the caption.", "Image 1 is better", 0.0),
    ("", "Image 1 is better", 0.0),
])
def test_accuracy_direct_accepts_the_implicit_prompts_period(text, label, want):
    from urt.rewards import get_reward

    assert get_reward("accuracy_direct")(text, label) == want


def test_the_exact_accuracy_reward_still_refuses_the_period():
    """CoT mode keeps the paper's exact match: accuracy_direct is a separate reward, not a change to it."""
    assert accuracy_reward("<think>x</think><answer>Image 1 is better.</answer>", "Image 1 is better") == 0.0
    assert accuracy_reward("Image 1 is better.", "Image 1 is better") == 0.0


def test_accuracy_direct_agrees_with_evaluation():
    """What evaluation counts as a correct direct answer is what GRPO w/o CoT is rewarded for."""
    from urt.prompts import answer_string, winner_of
    from urt.rewards import get_reward

    direct = get_reward("accuracy_direct")
    for task in ("image_generation", "video_generation", "image_understanding", "video_understanding"):
        for label in (1, 2):
            sol = answer_string(task, label)
            for text in (sol, sol + ".", f" {sol}. ", answer_string(task, 3 - label) + ".", sol + "!", sol.upper()):
                assert direct(text, sol) == float(winner_of(text, task) == label), (task, text)
    with pytest.raises(UrtError, match="accuracy_direct"):
        direct("Image 1 is better", "  ")


# --- registry and score -----------------------------------------------------------------------


def test_registry_builtin():
    assert {"format", "accuracy", "consistency"} <= set(REWARDS)
    assert get_reward("format") is format_reward
    with pytest.raises(UrtError, match="'formatt'.*accuracy, accuracy_direct, consistency, format"):
        get_reward("formatt")
    assert DEFAULT_WEIGHTS == {"format": 1.0, "accuracy": 1.0}


def test_register_custom(clean_registry):
    @register_reward("length")
    def length_reward(completion, solution=None, **kwargs):
        return min(len(completion), 10) / 10

    assert get_reward("length") is length_reward
    with pytest.raises(UrtError, match="'length' is already registered"):
        register_reward("length")(lambda c, s=None, **k: 0.0)
    with pytest.raises(UrtError, match="'format' is already registered"):
        register_reward("format")(lambda c, s=None, **k: 0.0)
    new = register_reward("length", override=True)(lambda c, s=None, **k: 0.5)
    assert get_reward("length") is new
    out = score(["abc"], ["x"], {"length": 2.0})
    assert out == {"rewards/length": [0.5], "reward": [1.0]}
    with pytest.raises(UrtError, match="name"):
        register_reward("")


def test_score_default_and_weighted():
    comps = [GOOD, "<answer>Image 1 is better</answer>", "junk", _cot(1, 2, "Image 1 is better")]
    sols = ["Image 1 is better"] * 4
    out = score(comps, sols)
    assert out["rewards/format"] == [1.0, 0.0, 0.0, 1.0]
    assert out["rewards/accuracy"] == [1.0, 1.0, 0.0, 1.0]
    assert out["reward"] == [2.0, 1.0, 0.0, 2.0]
    assert set(out) == {"rewards/format", "rewards/accuracy", "reward"}
    out = score(comps, sols, {"format": 1.0, "accuracy": 1.0, "consistency": 0.5})
    assert out["rewards/consistency"] == [1.0, 0.0, 0.0, 0.0]
    assert out["reward"] == [2.5, 1.0, 0.0, 2.0]
    assert score(comps, None, {"format": 1.0})["reward"] == [1.0, 0.0, 0.0, 1.0]
    assert score([], [], None) == {"rewards/format": [], "rewards/accuracy": [], "reward": []}


def test_score_errors():
    with pytest.raises(UrtError, match="2 completions but 1 solutions"):
        score(["a", "b"], ["x"])
    with pytest.raises(UrtError, match="'acc'"):
        score(["a"], ["x"], {"acc": 1.0})
    with pytest.raises(UrtError, match="weight of reward 'format'"):
        score(["a"], ["x"], {"format": "1"})
    with pytest.raises(UrtError, match="empty"):
        score(["a"], ["x"], {})
    with pytest.raises(UrtError, match="label"):
        score(["a"], None)  # accuracy needs labels


# --- properties -------------------------------------------------------------------------------

LABELS = st.sampled_from(["Image 1 is better", "Image 2 is better", "Video 1 is better", "Answer 2 is better"])


@given(st.text(), LABELS)
@settings(max_examples=300, deadline=None)
def test_no_reward_raises_on_any_text(text, label):
    for name, fn in REWARDS.items():
        assert fn(text, label) in (0.0, 1.0), name


PIECES = st.sampled_from(
    ["<think>", "</think>", "<answer>", "</answer>", "<think", "answer>", " ", "\n", "\t", "\r\n",
     "Image 1 is better", "Image 2 is better", "x", ""]
) | st.text(max_size=4)


@given(st.lists(PIECES, max_size=20).map("".join))
@settings(max_examples=500, deadline=None)
def test_format_matches_reference_on_tag_soup(text):
    assert format_reward(text) == ref_format(text)


@given(st.lists(PIECES, max_size=20).map("".join), st.one_of(LABELS, st.text(min_size=1)))
@settings(max_examples=500, deadline=None)
def test_accuracy_iff_extracted_equals_label(text, label):
    assume(label.strip())
    want = 1.0 if (text and ref_extract(text) == label.strip()) else 0.0
    assert accuracy_reward(text, label) == want


@given(st.text(alphabet=" \n\tabc<>/", max_size=10), st.text(max_size=10), LABELS, st.text(alphabet=" \n\t", max_size=3),
       st.text(alphabet=" \n\t", max_size=3), st.text(max_size=10))
@settings(max_examples=300, deadline=None)
def test_well_formed_outputs_score_as_expected(think, junk, label, ws1, ws2, tail):
    assume("</think>" not in think and "</answer>" not in tail)
    text = f"<think>{think}</think>{ws1}<answer>{ws2}{label}{ws1}</answer>{tail}"
    assert format_reward(text) == 1.0
    assert accuracy_reward(text, label) == 1.0
    if junk and not junk.startswith("<"):
        assert format_reward(junk + text) == 0.0  # anchored: leading text fails the format
    if "<answer>" not in junk:
        assert accuracy_reward(junk + text, label) == 1.0  # but the answer is still found


def test_build_rewards_from_a_config():
    """reward.imports / components / weights: the default is the paper's pair; components are Hydra-built
    callables; bad entries are errors naming the config key."""
    from urt.rewards import build_rewards, format_reward

    paper = build_rewards(None)
    assert paper.weights == {"format": 1.0, "accuracy": 1.0} and paper.functions["format"] is format_reward
    good = "<think>x</think><answer>Image 1 is better</answer>"
    got = build_rewards({"components": {"half": {"_target_": "urt.rewards.core.format_reward", "_partial_": True}},
                         "weights": {"format": 1.0, "half": 0.5}})(["nope", good], [None, None])
    assert got["rewards/half"] == [0.0, 1.0] and got["reward"] == [0.0, 1.5]
    with pytest.raises(UrtError, match=r"reward\.imports: cannot import 'no_such_pkg\.rewards'"):
        build_rewards({"imports": ["no_such_pkg.rewards"]})
    with pytest.raises(UrtError, match=r"reward\.components\.format: 'format' is a registered reward"):
        build_rewards({"components": {"format": {"_target_": "builtins.len", "_partial_": True}}})
    with pytest.raises(UrtError, match=r"reward\.components\.n built a int, not a callable"):
        build_rewards({"components": {"n": {"_target_": "builtins.int", "_args_": ["3"]}}})
    with pytest.raises(UrtError, match=r"unknown reward 'missing'"):
        build_rewards({"weights": {"missing": 1.0}})
    with pytest.raises(UrtError, match=r"reward\.weights\.format must be a number"):
        build_rewards({"weights": {"format": "high"}})


def test_score_passes_each_sample_its_own_arguments():
    from urt.rewards import score

    seen = []
    got = score(["a", "bb"], ["x", "y"], {"probe": 1.0},
                functions={"probe": lambda c, s, **kw: seen.append((c, s, kw)) or float(kw["meta"]["n"])},
                per_sample=[{"meta": {"n": 1}}, {"meta": {"n": 2}}])
    assert got["reward"] == [1.0, 2.0] and [c for c, _, _ in seen] == ["a", "bb"]
    with pytest.raises(UrtError, match="2 completions but 1 per-sample"):
        score(["a", "b"], None, {"format": 1.0}, per_sample=[{}])
