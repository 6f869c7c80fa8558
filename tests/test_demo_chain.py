"""The demo's chain check (urt/demo/chain.py): crafted chains for every error kind, the order a pair is shown in,
and the `chain` reward reading the sample's `meta` (directly and through a config's `reward.imports`)."""

from __future__ import annotations

import pytest
from PIL import Image

from urt.data.schema import Sample, Video
from urt.demo.data import _understanding_attributes, _with_describe
from urt.rewards.core import build_rewards, format_reward

_IMG = Image.new("RGB", (28, 28))


# urt.demo.chain is imported inside the tests, not at collection: its import registers the `chain` reward, which
# conftest's registry restore forgets after each test (the registry tests expect the built-in rewards alone)
def check_chain(*args, **kwargs):
    from urt.demo.chain import check_chain as f

    return f(*args, **kwargs)


def chain_reward(*args, **kwargs):
    from urt.demo.chain import chain_reward as f

    return f(*args, **kwargs)


def _think(*lines: str, answer: str) -> str:
    return "<think>\n" + "\n".join(lines) + f"\n</think>\n<answer>{answer}</answer>"


def _gen(label=1, swapped=False):
    """'a red circle': Image 1 a red circle, Image 2 a blue circle (stored order), with the teacher's chains."""
    s = Sample("g", "image_generation", label, [_IMG, _IMG], caption="a red circle",
               meta={"attributes": {"asks": {"color": "red", "shape": "circle"},
                                    "candidates": [{"color": "red", "shape": "circle"},
                                                   {"color": "blue", "shape": "circle"}]}})
    s = _with_describe(s)
    if swapped:
        s.meta["swapped"] = True
    return s.meta


GEN_SOUND = ("The caption asks for a red circle.",
             "Image 1 shows a red circle: red vs red yes, circle vs circle yes, so Image 1 (10/10) matches.",
             "Image 2 shows a blue circle: blue vs red no, circle vs circle yes, so Image 2 (5/10) does not match.")


def _und(question="what color is the shape?", answers=("red", "blue"), label=1):
    right = answers[label - 1]
    s = Sample("u", "image_understanding", label, [_IMG], question=question, answers=answers,
               meta={"attributes": _understanding_attributes(question, right, {"color": "red", "shape": "circle"})})
    return _with_describe(s).meta


UND_SOUND = ("Answer 1 says red. Answer 2 says blue.",
             "The question asks about the colour. The image shows a red circle, so the correct answer says red.",
             "Answer 1 says red: red vs red yes, so Answer 1 (10/10) fits.",
             "Answer 2 says blue: blue vs red no, so Answer 2 (1/10) does not fit.")


def _with(lines, i, new):
    out = list(lines)
    out[i] = new
    return out


def test_the_teachers_chain_is_sound_in_both_orders():
    meta = _gen()
    c = check_chain(_think(*GEN_SOUND, answer="Image 1 is better"), "image_generation", meta, 1)
    assert (c.kind, c.correct, c.outcome, c.lines_right) == ("sound", True, "sound_correct", 4)
    assert meta["describe"] == "\n".join(GEN_SOUND)  # the crafted chain is the teacher's
    # shown swapped (GRPO's order=random sets meta["swapped"]; evaluation passes its flag): Image 1 is the blue one
    sw = _gen(swapped=True)
    text = _think(sw["describe_swapped"], answer="Image 2 is better")
    assert check_chain(text, "image_generation", sw, 2).kind == "sound"
    assert check_chain(text, "image_generation", _gen(), 2, swapped=True).kind == "sound"
    # the stored order's chain for the swapped pair misdescribes both images
    assert check_chain(_think(*GEN_SOUND, answer="Image 1 is better"), "image_generation", sw, 2).kind == "perception"
    u = _und()
    assert u["describe"] == "\n".join(UND_SOUND)
    assert check_chain(_think(*UND_SOUND, answer="Answer 1 is better"), "image_understanding", u, 1).kind == "sound"
    # swapped understanding: the answers trade places
    text = _think(u["describe_swapped"], answer="Answer 2 is better")
    assert check_chain(text, "image_understanding", u, 2, swapped=True).kind == "sound"
    assert check_chain(text, "image_understanding", u, 2, swapped=False).kind == "reading"


def test_unparsable():
    meta = _gen()
    for text in ("\n".join(GEN_SOUND),                                   # no tags
                 _think(*GEN_SOUND, answer="the first one"),             # not an answer string
                 "<answer>Image 1 is better</answer>"):                   # no think block
        c = check_chain(text, "image_generation", meta, 1)
        assert c.kind == "unparsable" and chain_reward(text, task="image_generation", label=1, meta=meta) == 0.0


@pytest.mark.parametrize("lines", [
    _with(GEN_SOUND, 2, "Image 2/10) does not match."),                  # the broken line
    _with(GEN_SOUND, 1, "Image 1 shows a red circle, so Image 1 (10/10) matches."),  # no checks
    _with(GEN_SOUND, 1, "Image 1 shows a red circle: red vs red yes, so Image 1 (10/10) matches."),  # a check missing
    _with(GEN_SOUND, 1, "Image 2 shows a red circle: red vs red yes, circle vs circle yes, so Image 2 (10/10) matches."),
    GEN_SOUND[:2],                                                       # a line missing
    (*GEN_SOUND, "Image 2 matches."),                                    # a line too many
])
def test_broken_chains_pass_the_papers_format_regex(lines):
    text = _think(*lines, answer="Image 1 is better")
    c = check_chain(text, "image_generation", _gen(), 1)
    assert format_reward(text) == 1.0 and c.correct
    assert c.kind == "broken" and c.outcome == "lucky_correct"


def test_reading_errors():
    meta = _gen()
    c = check_chain(_think(*_with(GEN_SOUND, 0, "The caption asks for a red triangle."), *(), answer="Image 1 is better"),
                    "image_generation", meta, 1)
    assert c.kind == "reading" and c.first_error.line == 0
    # the caption read right in line 0 but miscopied into a check
    c = check_chain(_think(*_with(GEN_SOUND, 2, "Image 2 shows a blue circle: blue vs green no, circle vs circle yes, "
                                                "so Image 2 (5/10) does not match."), answer="Image 1 is better"),
                    "image_generation", meta, 1)
    assert c.kind == "reading" and c.first_error.line == 2
    u = _und()
    c = check_chain(_think(*_with(UND_SOUND, 0, "Answer 1 says red. Answer 2 says green."), answer="Answer 1 is better"),
                    "image_understanding", u, 1)
    assert c.kind == "reading" and c.correct
    # an invented yes/no question (the video-understanding failure)
    c = check_chain(_think(*_with(UND_SOUND, 1, "The question checks for red. The image shows a red circle: red vs red "
                                                "yes, so the correct answer says yes."), answer="Answer 1 is better"),
                    "image_understanding", u, 1)
    assert c.kind == "reading" and c.first_error.line == 1
    # asks about the shape when it asks the colour
    c = check_chain(_think(*_with(UND_SOUND, 1, "The question asks about the shape. The image shows a red circle, so "
                                                "the correct answer says circle."), answer="Answer 1 is better"),
                    "image_understanding", u, 1)
    assert c.kind == "reading"


def test_perception_errors():
    meta = _gen()
    # Image 2 described as the caption (the video-generation failure): both match, the answer is lucky
    lines = _with(GEN_SOUND, 2, "Image 2 shows a red circle: red vs red yes, circle vs circle yes, so Image 2 (10/10) "
                                "matches.")
    c = check_chain(_think(*lines, answer="Image 1 is better"), "image_generation", meta, 1)
    assert c.kind == "perception" and c.outcome == "lucky_correct" and c.first_error.line == 2
    u = _und()
    c = check_chain(_think(*_with(UND_SOUND, 1, "The question asks about the colour. The image shows a blue circle, so "
                                                "the correct answer says blue."), answer="Answer 2 is better"),
                    "image_understanding", u, 1)
    assert c.kind == "perception" and not c.correct


@pytest.mark.parametrize("i,line,answer", [
    (1, "Image 1 shows a red circle: red vs red no, circle vs circle yes, so Image 1 (5/10) does not match.", 1),  # check
    (1, "Image 1 shows a red circle: red vs red yes, circle vs circle yes, so Image 1 (5/10) matches.", 1),       # score
    (2, "Image 2 shows a blue circle: blue vs red no, circle vs circle yes, so Image 2 (5/10) matches.", 1),      # verdict
    (2, "Image 2 shows a blue circle: red vs red yes, circle vs circle yes, so Image 2 (10/10) matches.", 2),     # own description
    (0, GEN_SOUND[0], 2),                                                                   # the answer against the lines
])
def test_verdict_errors(i, line, answer):
    c = check_chain(_think(*_with(GEN_SOUND, i, line), answer=f"Image {answer} is better"), "image_generation", _gen(), 1)
    assert c.kind == "verdict"


def test_yes_no_and_video_chains():
    u = _und("is there a red shape in the image?", ("no", "yes"), label=2)
    lines = ["Answer 1 says no. Answer 2 says yes.",
             "The question checks for red. The image shows a red circle: red vs red yes, so the correct answer says yes.",
             "Answer 1 says no: no vs yes no, so Answer 1 (1/10) does not fit.",
             "Answer 2 says yes: yes vs yes yes, so Answer 2 (10/10) fits."]
    assert u["describe"] == "\n".join(lines)
    assert check_chain(_think(*lines, answer="Answer 2 is better"), "image_understanding", u, 2).kind == "sound"
    bad = _with(lines, 1, "The question checks for red. The image shows a red circle: red vs red no, so the correct "
                          "answer says no.")
    assert check_chain(_think(*bad, answer="Answer 1 is better"), "image_understanding", u, 2).kind == "verdict"
    # video generation: motion is an attribute of the caption and of each clip
    at, other = {"color": "red", "shape": "circle", "motion": "left"}, {"color": "red", "shape": "circle", "motion": "up"}
    s = _with_describe(Sample("v", "video_generation", 2, [Video(frames=[_IMG] * 4)] * 2, caption="a red circle moving left",
                              meta={"attributes": {"asks": at, "candidates": [other, at]}}))
    sound = s.meta["describe"].split("\n")
    assert sound[1].startswith("Video 1 shows a red circle moving up: red vs red yes, circle vs circle yes, up vs left no")
    assert check_chain(_think(*sound, answer="Video 2 is better"), "video_generation", s.meta, 2).kind == "sound"
    copied = _with(sound, 1, "Video 1 shows a red circle moving left: red vs red yes, circle vs circle yes, left vs left "
                             "yes, so Video 1 (10/10) matches.")
    c = check_chain(_think(*copied, answer="Video 2 is better"), "video_generation", s.meta, 2)
    assert c.kind == "perception" and c.outcome == "lucky_correct"


def test_chain_reward_reads_the_samples_meta():
    sound = _think(*GEN_SOUND, answer="Image 1 is better")
    assert chain_reward(sound, "Image 1 is better", task="image_generation", label=1, meta=_gen()) == 1.0
    # the same completion for the pair shown the other way round (meta["swapped"]): Image 1 is the blue circle
    assert chain_reward(sound, "Image 2 is better", task="image_generation", label=2, meta=_gen(swapped=True)) == 0.5
    # (right there: the caption line, and an answer that follows the chain's own verdicts)
    # a lucky chain (Image 2 described as the caption) scores its right lines only; accuracy pays it in full
    lucky = _think(*_with(GEN_SOUND, 2, "Image 2 shows a red circle: red vs red yes, circle vs circle yes, so Image 2 "
                                        "(10/10) matches."), answer="Image 1 is better")
    assert chain_reward(lucky, "Image 1 is better", task="image_generation", label=1, meta=_gen()) == 0.5
    # without the demo's attributes there is nothing to verify against
    assert chain_reward(sound, "Image 1 is better", task="image_generation", label=1, meta={}) == 0.0
    assert chain_reward(sound, "Image 1 is better", task="image_generation", label=1, meta={"attributes": {}}) == 0.0


def test_chain_reward_named_in_a_config_sees_meta_per_sample():
    rs = build_rewards({"imports": ["urt.demo.chain"], "weights": {"format": 1.0, "accuracy": 1.0, "chain": 1.0}})
    sound = _think(*GEN_SOUND, answer="Image 1 is better")
    lucky = _think(*_with(GEN_SOUND, 2, "Image 2 shows a red circle: red vs red yes, circle vs circle yes, so Image 2 "
                                        "(10/10) matches."), answer="Image 1 is better")
    own = [{"task": "image_generation", "label": 1, "key": f"g#{i}", "meta": _gen()} for i in range(2)]
    got = rs([sound, lucky], ["Image 1 is better"] * 2, own)
    assert got["rewards/accuracy"] == [1.0, 1.0]       # the outcome reward cannot tell them apart
    assert got["rewards/chain"] == [1.0, 0.5]
    assert got["reward"] == [3.0, 2.5]


def test_report_counts_sound_and_lucky_judgements_and_compares_them(tmp_path):
    """Crafted evaluation outputs of two stages on two pairs (both orders): the report's soundness counts, error
    kinds and the McNemar comparison of sound-correct judgements."""
    import json

    from urt.data.shards import write_shards
    from urt.demo.report import build_report, markdown, transition_lines

    g = Sample("g", "image_generation", 1, [_IMG, _IMG], caption="a red circle", meta=_gen())
    u = Sample("u", "image_understanding", 1, [_IMG], question="what color is the shape?", answers=("red", "blue"),
               meta=_und())
    write_shards([g, u], tmp_path / "data" / "test", prefix="t", overwrite=True)
    lucky_gen = _think(*_with(GEN_SOUND, 2, "Image 2 shows a red circle: red vs red yes, circle vs circle yes, so "
                                            "Image 2 (10/10) matches."), answer="Image 1 is better")
    outputs = {  # (key, swapped) -> (rejection sampling, grpo)
        ("g", False): (lucky_gen, _think(*GEN_SOUND, answer="Image 1 is better")),
        ("g", True): ("<answer>Image 1 is better</answer>", _think(g.meta["describe_swapped"], answer="Image 2 is better")),
        ("u", False): (_think(*_with(UND_SOUND, 1, "The question asks about the colour. The image shows a blue circle, "
                                                  "so the correct answer says blue."), answer="Answer 2 is better"),
                       _think(*UND_SOUND, answer="Answer 1 is better")),
        ("u", True): (_think(u.meta["describe_swapped"], answer="Answer 2 is better"),
                      _think("Answer 1 says red. Answer 2 says blue.",  # the answers as stored, not as shown
                             *u.meta["describe_swapped"].split("\n")[1:], answer="Answer 2 is better")),
    }
    stages = {}
    for i, name in enumerate(("rejection_sampling", "grpo")):
        d = tmp_path / "eval" / name / "shards-cot"
        d.mkdir(parents=True)
        d.joinpath("generations.jsonl").write_text("".join(
            json.dumps({"key": k, "output": out[i], "swapped": sw, "task": {"g": "image_generation",
                                                                             "u": "image_understanding"}[k]}) + "\n"
            for (k, sw), out in outputs.items()))
        d.joinpath("results.json").write_text(json.dumps({"shards": str(tmp_path / "data" / "test")}))
        st = {"overall": 0.5, "format_rate": 1.0, "answer_1_rate": 0.5, "gold_1_rate": 0.5, "tasks": {}}
        stages[name] = {"modes": {"cot": {"shards": st}}}
    rep = build_report(tmp_path, {"stages": stages})
    rs, gr = rep["soundness"]["rejection_sampling"], rep["soundness"]["grpo"]
    assert (rs["sound_correct"], rs["lucky_correct"], rs["wrong"]) == (1, 1, 2)
    assert rs["kinds"] == {"sound": 1, "unparsable": 1, "broken": 0, "reading": 0, "perception": 2, "verdict": 0}
    assert rs["tasks"]["image_generation"]["lucky_correct"] == 1
    # grpo: three sound chains and one that copies the answers in the wrong order (a lucky reading error)
    assert (gr["sound_correct"], gr["lucky_correct"], gr["wrong"]) == (3, 1, 0) and gr["kinds"]["reading"] == 1
    t = rep["transitions"]["grpo_vs_rejection_sampling"]
    assert (t["gained"], t["lost"]) == (2, 0)
    # sound-correct: three gained, and the one sound at rejection sampling is lucky after GRPO
    assert (t["sound_correct"]["gained"], t["sound_correct"]["lost"]) == (3, 1)
    assert t["sound_correct"]["p_value"] == 0.625
    assert rep["checks"]["grpo_more_sound_correct_than_rejection_sampling"] is True
    assert rep["checks"]["grpo_above_rejection_sampling_mcnemar_p_below_0.05"] is False  # 2 flips are not evidence
    md = markdown(rep)
    assert "| grpo | 3/4 | 1 | 0 | 0 | 0 | 1 | 0 | 0 |" in md
    assert any("sound-correct +3 / -1" in x for x in transition_lines(rep))


def test_report_says_what_the_grpo_reward_paid_for(tmp_path):
    """A crafted rollout table: one group of a sound, a lucky and a wrong completion; the positive advantage that
    went to the lucky one is what the outcome reward pays for luck."""
    import pandas as pd

    from urt.data.shards import write_shards
    from urt.demo.report import rollout_soundness

    g = Sample("g", "image_generation", 1, [_IMG, _IMG], caption="a red circle", meta=_gen())
    write_shards([g.swapped()], tmp_path / "rs_sample" / "grpo", prefix="t", overwrite=True)  # stored swapped
    sw = g.meta["describe_swapped"]
    lucky = _think("The caption asks for a red circle.",
                   "Image 1 shows a red circle: red vs red yes, circle vs circle yes, so Image 1 (10/10) matches.",
                   "Image 2 shows a red circle: red vs red yes, circle vs circle yes, so Image 2 (10/10) matches.",
                   answer="Image 2 is better")
    rows = [(_think(sw, answer="Image 2 is better"), 1.0), (lucky, 1.0), (_think(sw, answer="Image 1 is better"), -2.0)]
    (tmp_path / "grpo" / "rollouts").mkdir(parents=True)
    pd.DataFrame({"step": 0, "group": 0, "sample": range(3), "reward": 0.0, "prompt_key": "g",
                  "task": "image_generation", "label": 2, "swapped": True, "completion": [c for c, _ in rows],
                  "reward_accuracy": [1.0, 1.0, 0.0],
                  "advantage": [a for _, a in rows]}).to_parquet(tmp_path / "grpo" / "rollouts" / "step-000000.parquet")
    r = rollout_soundness(tmp_path / "grpo", tmp_path / "rs_sample" / "grpo")
    assert (r["n"], r["correct"], r["sound_correct"]) == (3, 2, 1)
    assert r["positive_advantage_not_sound_correct"] == 0.5 and r["groups_with_sound_correct"] == 1
    assert rollout_soundness(tmp_path / "nothing", tmp_path / "rs_sample" / "grpo") is None


def test_report_counts_sound_rejection_sampling_traces(tmp_path):
    """rs_sample/sft holds correct traces only; how many are sound, each checked in the order it was judged in."""
    from urt.data.shards import write_shards
    from urt.demo.report import trace_soundness

    def trace(key, label, meta, cot):
        return Sample(key, "image_generation", label, [_IMG, _IMG], caption="a red circle", meta=meta, cot=cot)

    sw = _gen(swapped=True)  # judged in the swapped order: meta["swapped"], the label as shown
    write_shards([trace("g#0", 1, _gen(), _think(*GEN_SOUND, answer="Image 1 is better")),
                  trace("g#1", 1, _gen(), _think(*_with(GEN_SOUND, 0, "The caption asks for a blue circle."),
                                                 answer="Image 1 is better")),
                  trace("g#2", 2, sw, _think(sw["describe_swapped"], answer="Image 2 is better"))],
                 tmp_path / "sft", prefix="t", overwrite=True)
    assert trace_soundness(tmp_path / "sft") == {"n": 3, "sound": 2, "tasks": {"image_generation": {"n": 3, "sound": 2}}}
    assert trace_soundness(tmp_path / "none") is None
