"""urt.eval without a model: metrics, scoring rules, both VL-RewardBench groupings, the predictions CLI
and the real reference benchmark files."""

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from urt.errors import UrtError
from urt.eval import (
    GroupedAccuracy,
    Item,
    PairwiseAccuracy,
    PositionConsistency,
    Prediction,
    TauDiff,
    load_items,
    read_predictions,
    score,
)
from urt.eval.cli import register

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "benchmarks"


def cot(ans: str) -> str:
    return f"<think>Image 1: 8/10\nImage 2: 7/10</think>\n<answer>{ans}</answer>"


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="urt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_counts_and_ddp_reduction():
    acc = PairwiseAccuracy()
    acc.update([1, 2, "tie", None, 1], [1, 1, "tie", 2, 2])
    assert int(acc.correct) == 2 and int(acc.total) == 5
    assert float(acc.compute()) == pytest.approx(0.4)
    # every state is a count summed across ranks
    for m in (PairwiseAccuracy(), TauDiff(), GroupedAccuracy(3), PositionConsistency()):
        assert m._reductions and all(fx is not None and fx.__name__.endswith("sum") for fx in m._reductions.values())
    # simulated two-rank merge == one metric over everything
    a, b, both = TauDiff(), TauDiff(), TauDiff()
    a.update([1, "tie"], [1, "tie"])
    b.update([2, 1, None], ["tie", 2, 1])
    both.update([1, "tie", 2, 1, None], [1, "tie", "tie", 2, 1])
    a.merge_state(b)
    assert {k: float(v) for k, v in a.compute().items()} == {k: float(v) for k, v in both.compute().items()}
    assert float(both.compute()["tau"]) == pytest.approx(2 / 5)
    assert float(both.compute()["diff"]) == pytest.approx(1 / 3)
    g = GroupedAccuracy(3)
    g.update([1, 1, 2], [1, 2, 2], [0, 0, 2])
    assert torch.isnan(g.macro())  # group 1 empty
    g.update([1], [1], [1])
    assert float(g.macro()) == pytest.approx((0.5 + 1 + 1) / 3)


# ---------------------------------------------------------------------------------------- GenAI
GEN_ITEMS = [
    Item("a", "image_generation", 1, {"vote": "leftvote"}),
    Item("b", "image_generation", 2, {"vote": "rightvote"}),
    Item("c", "image_generation", "tie", {"vote": "tievote"}),
    Item("d", "image_generation", "tie", {"vote": "bothbad_vote"}),
    Item("e", "image_generation", 1, {"vote": "leftvote"}),
    Item("f", "image_generation", 2, {"vote": "rightvote"}),
]


def gen_preds(wrap):
    return [
        Prediction("a", wrap("Image 1 is better")),  # right
        Prediction("b", wrap("Image 1 is better")),  # wrong
        Prediction("c", wrap("Both images are equally good")),  # right (tie said)
        Prediction("d", wrap("Image 2 is better")),  # wrong: gold tie (both bad)
        Prediction("e", wrap("Image 2 is better"), swapped=True),  # shown reversed: 2 -> 1, right
        Prediction("f", wrap("Image 2 is better"), swapped=True),  # shown reversed: 2 -> 1, wrong
    ]


def test_tau_diff_implicit_hand_computed():
    r = score(GEN_ITEMS, gen_preds(lambda s: s), benchmark="genai_bench_image", mode="implicit")
    # correct: a, c, e -> tau 3/6; non-tied a, b, e, f: a, e right -> diff 2/4
    assert r["tau"] == pytest.approx(3 / 6)
    assert r["diff"] == pytest.approx(2 / 4)
    assert r["accuracy"] == pytest.approx(3 / 6)
    assert r["tau_diff_counts"] == {"all": 6, "all_correct": 3, "non_tie": 4, "non_tie_correct": 2}
    assert r["by_vote"]["bothbad_vote"] == {"n": 1, "correct": 0, "accuracy": 0.0}
    assert r["by_vote"]["tievote"]["accuracy"] == 1.0
    assert r["by_task"]["image_generation"]["tau"] == pytest.approx(0.5)
    # position, in presented order: said 1: a, b; said tie: c; said 2: d, e, f
    p = r["position"]
    assert p["pred_1_rate"] == pytest.approx(2 / 6) and p["pred_2_rate"] == pytest.approx(3 / 6)
    assert p["pred_tie_rate"] == pytest.approx(1 / 6)
    # presented gold: a 1, b 2, c tie, d tie, e 2 (1 swapped), f 1 (2 swapped)
    assert p["gold_1_rate"] == pytest.approx(2 / 6) and p["gold_tie_rate"] == pytest.approx(2 / 6)


def test_tau_is_dash_in_cot_mode(tmp_path):
    from urt.eval import markdown

    r = score(GEN_ITEMS, gen_preds(cot), benchmark="genai_bench_image", mode="cot")
    assert r["tau"] is None and "tau_note" in r
    assert r["diff"] == pytest.approx(2 / 4)
    assert r["format_valid_rate"] == 1.0
    assert "| tau | – |" in markdown(r)
    assert "| diff | 50.0 |" in markdown(r)


def test_malformed_outputs_count_wrong_no_substring_matching():
    items = [Item(k, "image_generation", 1) for k in "pqrstu"]
    preds = [
        Prediction("p", "Image 1 is better"),  # CoT mode: no <answer> tag
        Prediction("q", "<think>x</think><answer>image 1 is better</answer>"),  # wrong case
        Prediction("r", "<think>Image 1 is better</think><answer>Image 1 is better and Image 2 is better</answer>"),
        Prediction("s", "<think>x</think><answer>Video 1 is better</answer>"),  # another task's string
        Prediction("t", "<think>truncated ... Image 1 is better"),
        Prediction("u", "<answer>Image 1 is better</answer>"),  # right answer, bad format
    ]
    r = score(items, preds, benchmark="genai_bench_image", mode="cot")
    assert r["correct"] == 1 and r["accuracy"] == pytest.approx(1 / 6)
    assert r["format_valid_rate"] == pytest.approx(3 / 6)  # q, r, s match the paper's format regex
    assert r["answer_parsed_rate"] == pytest.approx(1 / 6)
    assert r["position"]["pred_none_rate"] == pytest.approx(5 / 6)
    # implicit mode: the whole output must be an answer string; "...Image 1 is better" inside text is not
    r2 = score(items[:1], [Prediction("p", "I think Image 1 is better")], benchmark="genai_bench_image",
               mode="implicit")
    assert r2["accuracy"] == 0.0


def test_both_orders_consistency():
    items = [Item("x", "image_understanding", 1), Item("y", "image_understanding", 2),
             Item("z", "image_understanding", 1)]
    a = lambda n: cot(f"Answer {n} is better")  # noqa: E731
    preds = [
        Prediction("x", a(1)), Prediction("x", a(2), swapped=True),  # consistent (1, 1), both right
        Prediction("y", a(1)), Prediction("y", a(1), swapped=True),  # says "1" both times: 1 vs 2
        Prediction("z", a(1)),  # one order only
    ]
    r = score(items, preds, mode="cot")
    assert r["counts"]["judgements"] == 5 and r["counts"]["both_orders"] == 2
    assert r["counts"]["orders"] == {"original": 3, "swapped": 2}
    assert r["position"]["consistency"] == {"pairs": 2, "consistent": 1, "rate": 0.5}
    assert r["accuracy"] == pytest.approx(4 / 5)  # x, x, y(swapped: 1 -> 2), z right; y original wrong
    assert r["position"]["pred_1_rate"] == pytest.approx(4 / 5)


# ----------------------------------------------------------------------------------- VL-RewardBench
# id -> (label, prediction right?)
VL = {
    "hallucination_pair-1": (1, True), "hallucination_pair-2": (2, True), "RLAIF-1": (1, False),
    "RLHF-1": (1, False), "mathverse-1": (1, True), "mmmu-1": (2, True), "mmmu-2": (1, False),
    "wildvision-1": (1, True), "jailbreak-1": (1, False),
}


def vl_file(tmp_path):
    rows = [{"id": i, "query": f"q {i}", "response": ["r1", "r2"], "image": f"images/{i}.png",
             "human_ranking": [0, 1] if lab == 1 else [1, 0], "models": ["a", "b"], "judge": "human",
             "rationale": "", "query_source": "x", "ground_truth": ""} for i, (lab, _) in VL.items()]
    path = tmp_path / "vl.json"
    path.write_text(json.dumps(rows))
    return path


def vl_pred_rows(skip=()):
    out = []
    for i, (lab, right) in VL.items():
        if i in skip:
            continue
        said = lab if right else 3 - lab
        out.append({"key": i, "output": cot(f"Answer {said} is better")})
    return out


def test_vl_rewardbench_both_groupings(tmp_path):
    items = load_items("vl_rewardbench", vl_file(tmp_path))
    assert {it.key: it.label for it in items} == {k: v[0] for k, v in VL.items()}
    preds = [Prediction(r["key"], r["output"]) for r in vl_pred_rows()]
    r = score(items, preds, benchmark="vl_rewardbench")
    off, scr = r["vl_rewardbench"]["official"], r["vl_rewardbench"]["official_script"]
    # official: general {wildvision ok, jailbreak x} 1/2; hallucination {hp1 ok, hp2 ok, RLAIF x, RLHF x} 2/4;
    # reasoning {mathverse ok, mmmu-1 ok, mmmu-2 x} 2/3
    assert {g: (b["n"], b["correct"]) for g, b in off["groups"].items()} == {
        "general": (2, 1), "hallucination": (4, 2), "reasoning": (3, 2)}
    assert off["macro"] == pytest.approx((1 / 2 + 2 / 4 + 2 / 3) / 3)
    # official_script: POVID (hallucination_pair) counted as general: general 3/4, hallucination 0/2
    assert {g: (b["n"], b["correct"]) for g, b in scr["groups"].items()} == {
        "general": (4, 3), "hallucination": (2, 0), "reasoning": (3, 2)}
    assert scr["macro"] == pytest.approx((3 / 4 + 0 + 2 / 3) / 3)
    assert off["overall"] == scr["overall"] == r["accuracy"] == pytest.approx(5 / 9)


def test_predictions_cli_missing_unknown_and_results(tmp_path):
    bench = vl_file(tmp_path)
    rows = vl_pred_rows(skip=("mmmu-2", "RLHF-1"))  # two items missing (both would have been wrong)
    rows.append({"key": "not-in-benchmark", "output": cot("Answer 1 is better")})
    rows.append({"key": "jailbreak-1", "output": cot("Answer 2 is better"), "swapped": True})  # reversed 2 -> 1: right
    preds = write_jsonl(tmp_path / "preds.jsonl", rows)
    out = tmp_path / "res"
    assert run_cli(["eval", "--predictions", str(preds), "--benchmark", "vl_rewardbench",
                    "--benchmark-file", str(bench), "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    c = r["counts"]
    assert c["items"] == 9 and c["items_predicted"] == 7 and c["judgements"] == 8
    assert c["missing"] == 2 and set(c["missing_keys"]) == {"mmmu-2", "RLHF-1"}
    assert c["unknown"] == 1 and c["unknown_keys"] == ["not-in-benchmark"]
    assert r["complete"] is False
    # right: hp1, hp2, mathverse, mmmu-1, wildvision, jailbreak(swapped) = 6 of 8 judgements
    assert r["correct"] == 6 and r["accuracy"] == pytest.approx(6 / 8)
    assert r["accuracy_missing_as_wrong"] == pytest.approx(6 / 10)
    assert r["vl_rewardbench"]["official"]["groups"]["reasoning"] == {"n": 2, "correct": 2, "accuracy": 1.0}
    md = (out / "results.md").read_text()
    assert "INCOMPLETE: 2 item(s)" in md and "not-in-benchmark" in md
    assert "| official |" in md and "| official_script |" in md


def test_predictions_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"key": "a", "output": "x"}) + "\n{not json\n")
    with pytest.raises(UrtError, match="line 2"):
        read_predictions(bad)
    bad.write_text(json.dumps({"key": "a", "output": "x"}) + "\n\n" + json.dumps({"key": "b"}) + "\n")
    with pytest.raises(UrtError, match="line 3.*output"):
        read_predictions(bad)
    bad.write_text(json.dumps({"key": "a", "output": "x", "swapped": "yes"}) + "\n")
    with pytest.raises(UrtError, match="line 1.*swapped"):
        read_predictions(bad)
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"key": "k7", "output": "x"}, {"key": "k7", "output": "x", "swapped": True},
                                               {"key": "k7", "output": "y"}])
    with pytest.raises(UrtError, match="duplicate prediction for key 'k7'"):
        read_predictions(dup)
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"key": 5, "output": "x"}])
    assert read_predictions(ok)[0].key == "5"
    # the CLI reports these as errors (the urt main turns UrtError into exit code 2)
    with pytest.raises(UrtError, match="duplicate"):
        run_cli(["eval", "--predictions", str(dup), "--benchmark", "vl_rewardbench", "--benchmark-file",
                 str(vl_file(tmp_path)), "--out", str(tmp_path / "o")])
    # a prediction whose task contradicts the benchmark item
    with pytest.raises(UrtError, match="task"):
        score([Item("a", "image_understanding", 1)], [Prediction("a", "x", task="video_generation")])


# ------------------------------------------------------------------------------ real reference files
@pytest.mark.skipif(not (REF / "vl_rewardbench.json").is_file(), reason="reference benchmarks not present")
def test_real_vl_rewardbench_always_answer_1(tmp_path):
    raw = json.loads((REF / "vl_rewardbench.json").read_text())
    gold1 = sum(1 for it in raw if it["human_ranking"][0] == 0) / len(raw)
    items = load_items("vl_rewardbench", REF / "vl_rewardbench.json")
    rows = [{"key": it.key, "output": cot("Answer 1 is better")} for it in items]
    preds = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "res"
    assert run_cli(["eval", "--predictions", str(preds), "--benchmark", "vl_rewardbench", "--benchmark-file",
                    str(REF / "vl_rewardbench.json"), "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["counts"]["items"] == 1250 and r["counts"]["missing"] == 0 and r["complete"]
    assert r["accuracy"] == pytest.approx(gold1)
    assert r["position"]["gold_1_rate"] == pytest.approx(gold1) and r["position"]["pred_1_rate"] == 1.0
    sizes = {s: tuple(r["vl_rewardbench"][s]["groups"][g]["n"] for g in ("general", "hallucination", "reasoning"))
             for s in ("official", "official_script")}
    assert sizes == {"official": (183, 749, 318), "official_script": (631, 301, 318)}
    # group sizes recomputed from the raw ids
    pref = Counter("hallucination" if i["id"].startswith(("hallucination_pair", "RLAIF", "RLHF")) else
                   "reasoning" if i["id"].startswith(("mathverse", "mmmu")) else "general" for i in raw)
    assert (pref["general"], pref["hallucination"], pref["reasoning"]) == sizes["official"]


@pytest.mark.skipif(not (REF / "genai_bench_video.json").is_file(), reason="reference benchmarks not present")
def test_real_genai_video_always_left_and_swapped(tmp_path):
    raw = json.loads((REF / "genai_bench_video.json").read_text())
    votes = Counter(it["vote_type"] for it in raw)
    tau = votes["leftvote"] / len(raw)
    diff = votes["leftvote"] / (votes["leftvote"] + votes["rightvote"])
    items = load_items("genai_bench_video", REF / "genai_bench_video.json")
    assert len(items) == len(raw)
    plain = [Prediction(str(it["id"]), "Video 1 is better") for it in raw]
    # the same judgement with the videos shown reversed: the model says 2, which maps back to 1
    swapped = [Prediction(str(it["id"]), "Video 2 is better", swapped=True) for it in raw]
    for preds in (plain, swapped):
        r = score(items, preds, benchmark="genai_bench_video", mode="implicit")
        assert r["tau"] == pytest.approx(tau) and r["diff"] == pytest.approx(diff)
    r = score(items, plain + swapped, benchmark="genai_bench_video", mode="implicit")
    assert r["position"]["consistency"]["rate"] == 1.0 and r["position"]["consistency"]["pairs"] == len(raw)
    assert r["position"]["pred_1_rate"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ paired comparison
def test_judgement_outcomes_map_swapped_answers_back_and_agree_with_the_accuracy():
    from urt.eval.benchmarks import judgement_outcomes

    items = [Item("a", "image_generation", 1), Item("b", "image_generation", 2), Item("c", "image_generation", "tie")]
    preds = [Prediction("a", cot("Image 1 is better")),
             Prediction("a", cot("Image 1 is better"), swapped=True),  # shown swapped: says the original 2
             Prediction("b", cot("Image 1 is better"), swapped=True),  # shown swapped: the original 2, right
             Prediction("b", "no answer at all"),
             Prediction("c", cot("Image 1 is better"))]
    got = judgement_outcomes(items, preds)
    assert got == {("a", False): True, ("a", True): False, ("b", True): True, ("b", False): False,
                   ("c", False): False}
    res = score(items, preds)
    assert res["accuracy"] == pytest.approx(sum(got.values()) / len(got))
    with pytest.raises(UrtError, match="'zz'.*matches no item"):
        judgement_outcomes(items, [Prediction("zz", cot("Image 1 is better"))])


def test_paired_comparison_counts_flips_and_gives_the_exact_mcnemar_p():
    from urt.eval.benchmarks import paired_comparison

    keys = [(f"k{i}", s) for i in range(20) for s in (False, True)]
    before = {k: i < 30 for i, k in enumerate(keys)}  # 30 of 40 right
    after = dict(before)
    for k in keys[:5]:  # 5 right -> wrong, nothing gained
        after[k] = False
    r = paired_comparison(before, after)
    assert (r["n"], r["gained"], r["lost"]) == (40, 0, 5)
    assert r["p_value"] == pytest.approx(2 / 2 ** 5)  # both tails of Binomial(5, 1/2) at 0 and 5
    for k in keys[30:37]:  # and 7 wrong -> right: 7 vs 5 of 12 discordant
        after[k] = True
    r = paired_comparison(before, after)
    assert (r["gained"], r["lost"]) == (7, 5)
    assert r["p_value"] == pytest.approx(2 * sum(math.comb(12, i) for i in range(6)) / 2 ** 12)  # 0.774
    assert paired_comparison(before, before) == {"n": 40, "gained": 0, "lost": 0, "p_value": 1.0}
    # only the judgements both models made are compared
    assert paired_comparison(before, {keys[0]: False})["n"] == 1
