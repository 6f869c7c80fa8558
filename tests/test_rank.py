"""Win rates of a group (urt.judge.group, Judge.win_rates / judge_groups), candidate visual features once per
group, and `urt rank` (urt.judge.rank)."""

from __future__ import annotations

import argparse
import json
import re

import pytest

import urt.judge.core as judge_mod
from data_fixtures import mp4_bytes, vqa_image
from urt.errors import UrtError
from urt.generation import Completion, GenerationConfig
from urt.judge import Judge
from urt.judge.group import PairVerdict, advantages, dpo_pairs, schedule, tally
from urt.models import build_tiny

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: one thread beats two on 2 cores


# ------------------------------------------------------------------------------------------ arithmetic


def test_tally_ties_unparsable_consistency_by_hand():
    P = PairVerdict
    pairs = [P(0, 1, 0, "tie"), P(0, 1, 1, 0),       # 0: 1 tie, 1 win   1: 1 tie, 1 loss
             P(0, 2, 0, None), P(0, 2, 2, 2),        # 0: 1 unparsable, 1 loss   2: 1 unparsable, 1 win
             P(1, 2, 1, "tie"), P(1, 2, 2, "tie")]   # 1: 2 ties   2: 2 ties
    r = tally(3, pairs)
    assert (r.wins, r.losses, r.ties, r.unparsable) == ([1, 0, 1], [1, 1, 0], [1, 3, 2], [1, 0, 1])
    assert r.win_rates == pytest.approx([(1 + 0.5) / 3, 1.5 / 4, (1 + 1) / 3])
    assert r.decided == [3, 4, 3]
    # (0,1): tie vs 0 disagree; (0,2) has an unparsable verdict: left out; (1,2): tie, tie agree
    assert r.position_consistency == 0.5
    assert r.intransitive_triples == 0  # 0>1, 2>0, 1-2 undecided: no cycle
    apart = tally(3, pairs, ties="apart")
    assert apart.win_rates == pytest.approx([1 / 2, 0 / 1, 1 / 1])
    assert r.ranking == [2, 0, 1]
    # nothing decided: 0.5, no information
    none = tally(2, [P(0, 1, 0, None)])
    assert none.win_rates == [0.5, 0.5] and none.unparsable == [1, 1] and none.position_consistency is None


def test_intransitive_triples_by_hand():
    P = PairVerdict
    cycle = [P(0, 1, 0, 0), P(1, 2, 1, 1), P(0, 2, 0, 2)]  # 0>1, 1>2, 2>0
    assert tally(3, cycle).intransitive_triples == 1
    assert tally(3, cycle[:2] + [P(0, 2, 0, 0)]).intransitive_triples == 0
    # 4 candidates: the cycle 1>2>3>1 plus 0 beating everyone -> one cyclic triple out of four
    four = [P(0, c, 0, 0) for c in (1, 2, 3)] + [P(1, 2, 1, 1), P(2, 3, 2, 2), P(1, 3, 3, 3)]
    assert tally(4, four).intransitive_triples == 1
    # a pair with no majority (one verdict each way) closes no cycle
    split = cycle[:2] + [P(0, 2, 0, 2), P(0, 2, 2, 0)]
    assert tally(3, split).intransitive_triples == 0
    with pytest.raises(UrtError, match="neither candidate"):
        tally(3, [P(0, 1, 0, 2)])


def test_schedule_budget_and_dpo_and_advantages():
    assert schedule(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    for n, k in ((10, 2), (10, 3), (9, 4), (16, 5)):
        pairs = schedule(n, k)
        meets = [sum(c in p for p in pairs) for c in range(n)]
        assert min(meets) >= k and len(pairs) < n * (n - 1) // 2 and len(set(pairs)) == len(pairs)
    assert schedule(5, 10) == schedule(5)
    with pytest.raises(UrtError):
        schedule(1)
    r = tally(3, [PairVerdict(0, 1, 0, 0), PairVerdict(0, 2, 0, 0), PairVerdict(1, 2, 1, 1)])
    assert r.win_rates == [1.0, 0.5, 0.0]
    assert dpo_pairs(r) == [(0, 2, 1.0)]
    assert dpo_pairs(r, policy="all") == [(0, 2, 1.0), (0, 1, 0.5), (1, 2, 0.5)]
    assert dpo_pairs(r, policy="all", min_margin=0.5) == [(0, 2, 1.0)]
    assert dpo_pairs(tally(2, [PairVerdict(0, 1, 0, "tie")])) == []  # no preference, no pair
    adv = advantages([1.0, 0.5, 0.0])
    assert adv == pytest.approx([1.0, 0.0, -1.0], abs=1e-3) and advantages([0.5, 0.5]) == [0.0, 0.0]


# ------------------------------------------------------------------------------------------ the judge


@pytest.fixture(scope="module")
def judge():
    return Judge(build_tiny("qwen2_5_vl", seed=0), generation=GenerationConfig(max_new_tokens=6), frames=4)


def _answer(n: int) -> str:
    return f"<think>x</think>\n<answer>Image {n} is better</answer>"


# Crafted verdicts about the order shown: (first, second) -> text
CRAFTED = {
    (0, 1): _answer(1), (1, 0): _answer(2),      # 0 beats 1, both orders
    (0, 2): _answer(1), (2, 0): _answer(2),      # 0 beats 2
    (0, 3): _answer(1), (3, 0): _answer(1),      # position bias: whoever is first wins
    (1, 2): _answer(1), (2, 1): _answer(2),      # 1 beats 2
    (1, 3): "no answer here", (3, 1): _answer(1),  # 3 beats 1 once, one unparsable
    (2, 3): _answer(1), (3, 2): _answer(2),      # 2 beats 3  -> 1>2>3>1 is a cycle
}


def _stub_generate(table):
    def fake(bundle, encoded, cfg, **kw):
        out = []
        for e in encoded:
            a, b = map(int, re.search(r":(\d+)-(\d+)$", e.key).groups())
            out.append([Completion(table[(a, b)], (1,), "stop")])
        return out
    return fake


def test_win_rates_on_crafted_verdicts(judge, monkeypatch):
    monkeypatch.setattr(judge_mod, "generate", _stub_generate(CRAFTED))
    imgs = [vqa_image(i) for i in range(4)]
    r = judge.win_rates("a red circle", imgs)
    assert len(r.pairs) == 12 and r.meta["verdicts"] == 12
    assert r.wins == [5, 2, 2, 2] and r.losses == [1, 3, 4, 3] and r.ties == [0] * 4
    assert r.unparsable == [0, 1, 0, 1]
    assert r.win_rates == pytest.approx([5 / 6, 2 / 5, 2 / 6, 2 / 5])
    assert r.position_consistency == pytest.approx(4 / 5)
    assert r.intransitive_triples == 1
    assert r.ranking == [0, 1, 3, 2]
    swapped = [p for p in r.pairs if p.first != p.i]
    assert len(swapped) == 6 and all(p.verdict.swapped for p in swapped)
    # one order only: (i, j) with i < j shown first
    one = judge.win_rates("a red circle", imgs, both_orders=False)
    assert len(one.pairs) == 6 and all(p.first == p.i for p in one.pairs)
    assert one.wins == [3, 1, 1, 0] and one.unparsable == [0, 1, 0, 1]


def _tower_counter(judge):
    seen: list[int] = []

    def hook(module, args, kwargs, out):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        seen.append(int(grid.shape[0]))

    return seen, judge.bundle.model.model.visual.register_forward_hook(hook, with_kwargs=True)


def test_visual_features_once_per_candidate_and_exact(judge):
    imgs = [vqa_image(i) for i in range(4)]
    seen, handle = _tower_counter(judge)
    try:
        r = judge.win_rates("a red circle", imgs)
        assert sum(seen) == 4 and r.meta["visual_items_encoded"] == 4  # N images through the tower, not 2·12
        seen.clear()
        alone = []
        for p in r.pairs:  # each pair on its own: the normal path, one prompt per generate call
            g = judge.group("a red circle", imgs)
            alone.append(judge.judge([g.sample(p.first, p.j if p.first == p.i else p.i)])[0])
        assert sum(seen) == 2 * len(r.pairs)
    finally:
        handle.remove()
    for p, v in zip(r.pairs, alone):
        assert p.verdict.text == v.text
    off = judge.win_rates("a red circle", imgs, reuse_visuals=False)
    assert off.win_rates == r.win_rates and [p.verdict.text for p in off.pairs] == [p.verdict.text for p in r.pairs]


def test_video_and_answer_groups_reuse(judge, tmp_path):
    vids = []
    for seed in (0, 30, 60):
        p = tmp_path / f"v{seed}.mp4"
        p.write_bytes(mp4_bytes(8, 6.0, seed=seed))
        vids.append(str(p))
    seen, handle = _tower_counter(judge)
    try:
        r = judge.win_rates("a moving square", vids)
        # odd N: the matching covers 2 candidates, the third comes with a partner encoded twice
        assert r.meta["task"] == "video_generation" and sum(seen) == 4 and r.meta["visual_items_encoded"] == 4
        seen.clear()
        a = judge.win_rates("What colour is the shape?", ["red", "blue", "green"], image=vqa_image(0))
        assert a.meta["task"] == "image_understanding" and sum(seen) == 1 and len(a.pairs) == 6
    finally:
        handle.remove()
    off = judge.win_rates("a moving square", vids, reuse_visuals=False)
    assert [p.verdict.text for p in off.pairs] == [p.verdict.text for p in r.pairs]


def test_group_errors_name_the_candidate(judge, tmp_path):
    good = tmp_path / "a.png"
    vqa_image(0).save(good)
    with pytest.raises(UrtError, match=r"candidate 1 \(.*missing.png\)"):
        judge.win_rates("x", [str(good), str(tmp_path / "missing.png")])
    with pytest.raises(UrtError, match="at least 2 candidates"):
        judge.win_rates("x", [str(good)])
    with pytest.raises(UrtError, match="exactly one of image= or video="):
        judge.win_rates("q", ["a", "b"], kind="answers")


# ------------------------------------------------------------------------------------------ urt rank


def _rank_args(inputs, out, *extra):
    from urt.judge.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["rank", *map(str, inputs), "--out", str(out), "--max-new-tokens", "4",
                              "--no-progress", *extra])


def _write_groups(d, lines):
    p = d / "groups.jsonl"
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return p


def test_rank_cli_outputs_resume_and_bad_files(tmp_path, monkeypatch, capsys):
    import pandas as pd

    monkeypatch.setattr(judge_mod, "generate", _stub_generate(CRAFTED))
    for i in range(4):
        vqa_image(i).save(tmp_path / f"im{i}.png")
    ims = [f"im{i}.png" for i in range(4)]
    src = _write_groups(tmp_path, [
        {"key": "g1", "caption": "a red circle", "images": ims, "expected": 0},
        "{not json",
        {"caption": "x", "images": ["im0.png", "missing.png"]},
    ])
    out = tmp_path / "out"
    args = _rank_args([src], out)
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["groups_ranked"] == 1 and summary["groups_skipped"] == 2
    assert summary["skipped_by_reason"] == {"bad line": 1, "bad file": 1}
    assert summary["expected_top1"] == {"matches": 1.0, "groups": 1, "rate": 1.0, "chance": 0.25}
    rows = [json.loads(x) for x in (out / "rankings.jsonl").read_text().splitlines()]
    assert rows[0]["key"] == "g1" and rows[0]["ranking"] == [0, 1, 3, 2] and rows[0]["intransitive_triples"] == 1
    assert rows[0]["candidates"] == ims
    dpo = [json.loads(x) for x in (out / "dpo.jsonl").read_text().splitlines()]
    assert [(d["chosen"], d["rejected"]) for d in dpo] == [("im0.png", "im2.png")]
    assert dpo[0]["margin"] == pytest.approx(5 / 6 - 2 / 6)
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert any("missing.png" in s["message"] and s["id"].endswith(":3") for s in skipped)
    assert pd.read_parquet(out / "dpo.parquet")["margin"].tolist() == pytest.approx([0.5])
    assert pd.read_parquet(out / "rankings.parquet")["key"].tolist() == ["g1"]

    # resume: an interrupted write left half a line; a new group was appended to the input
    with open(out / "rankings.jsonl", "a") as f:
        f.write('{"id": "half')
    with open(src, "a") as f:
        f.write(json.dumps({"key": "g2", "caption": "a blue square", "images": ims[:3]}) + "\n")
    args = _rank_args([tmp_path], out, "--dpo", "all")  # a folder of shards
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["groups_ranked"] == 1 and summary["groups_resumed"] == 3 and summary["groups_skipped"] == 0
    keys = [json.loads(x)["key"] for x in (out / "rankings.jsonl").read_text().splitlines()]
    assert keys == ["g1", "g2"]

    # drop: the bad candidate goes, the group is ranked without it (indices refer to the input)
    d = tmp_path / "drop"
    d.mkdir()
    for i in range(3):
        vqa_image(i).save(d / f"im{i}.png")
    g = _write_groups(d, [{"caption": "c", "images": ["im0.png", "missing.png", "im1.png", "im2.png"]}])
    args = _rank_args([g], d / "out", "--on-bad", "drop")
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["candidates_dropped"] == 1 and summary["groups_ranked"] == 1
    row = json.loads((d / "out" / "rankings.jsonl").read_text())
    assert row["candidate_index"] == [0, 2, 3] and sorted(row["ranking"]) == [0, 2, 3]
    with pytest.raises(UrtError, match=r"groups.jsonl:1: .*candidate 1 \(.*missing.png\)"):
        args = _rank_args([g], d / "out2", "--on-bad", "fail")
        args.func(args)


def test_rank_real_tiny_model_end_to_end(tmp_path, capsys):
    for i in range(3):
        vqa_image(i).save(tmp_path / f"im{i}.png")
    src = _write_groups(tmp_path, [{"caption": "a red circle", "images": [f"im{i}.png" for i in range(3)]}])
    args = _rank_args([src], tmp_path / "out", "--family", "qwen2_5_vl")
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["groups_ranked"] == 1 and summary["verdicts"] == 6
    row = json.loads((tmp_path / "out" / "rankings.jsonl").read_text())
    assert len(row["win_rates"]) == 3 and sorted(row["ranking"]) == [0, 1, 2]
    assert sum(row["unparsable"]) + sum(row["decided"]) == 12  # every verdict counted once per candidate


def test_benchmark_runs_at_toy_size():
    """benchmarks/win_rates.py at a toy size: the three modes agree and the tower counts are as claimed (the
    timings are not checked)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "win_rates.py"
    spec = importlib.util.spec_from_file_location("win_rates_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--n", "3", "--max-new-tokens", "2", "--image-size", "56", "--repeats", "1",
                    "--vision-depth", "1", "--vision-width", "64", "--threads", "1"])
    assert out["same_verdicts"] and out["verdicts"] == 6
    assert out["per_request"]["tower_images"] == 12 and out["batched_no_reuse"]["tower_images"] == 12
    assert out["win_rates"]["tower_images"] == 4  # odd N: one candidate's partner is encoded twice


def test_easy_vqa_rank_groups(tmp_path):
    """urt.demo.rank: groups of easy-vqa test images, one matching the caption at a random position."""
    pytest.importorskip("easy_vqa")
    from urt.demo.data import image_attributes
    from urt.demo.rank import build_rank_groups

    path = build_rank_groups(tmp_path, groups=6, n=6, seed=1)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    attrs, _ = image_attributes("test")
    assert len(rows) == 6 and len({r["expected"] for r in rows}) > 1  # the match is not always first
    for r in rows:
        assert len(r["images"]) == 6 and all((tmp_path / p).is_file() for p in r["images"])
        ids = r["meta"]["image_ids"]
        combos = [(attrs[i]["color"], attrs[i]["shape"]) for i in ids]
        good = combos[r["expected"]]
        assert r["caption"] == f"a {good[0]} {good[1]}" and len(set(combos)) == 6
    assert build_rank_groups(tmp_path, groups=6, n=6, seed=1).read_text() == path.read_text()


def test_sampled_reuse_matches_and_compose_checks_sizes(judge):
    import dataclasses

    from urt.rl.visual_cache import VisualCache

    imgs = [vqa_image(i) for i in range(3)]
    sampled = Judge(judge.bundle, generation=dataclasses.replace(judge.generation, temperature=1.0, seed=3))
    a = sampled.win_rates("a red circle", imgs)
    b = sampled.win_rates("a red circle", imgs, reuse_visuals=False)
    assert [p.verdict.text for p in a.pairs] == [p.verdict.text for p in b.pairs]  # same seed, same draws

    small, big = vqa_image(0).resize((28, 28)), vqa_image(1).resize((56, 56))
    g = judge.group("x", [small, big])
    src, target = judge.encoder(g.sample(0, 1)), judge.encoder(g.sample(1, 0))
    cache = VisualCache(judge.bundle.model, judge.family, [src], inference=True)
    with pytest.raises(UrtError, match="not the same size"):
        cache.compose(target, images=[(src, 0), (src, 1)])  # the candidates' features in the wrong order
    with pytest.raises(UrtError, match="1 images"):
        cache.compose(target, images=[(src, 1)])
    cache.compose(target, images=[(src, 1), (src, 0)])
    assert cache.composed == 1 and cache.encoded == 1


def test_rank_skips_only_the_group_the_judge_fails_on(tmp_path, monkeypatch, capsys):
    fake = _stub_generate(CRAFTED)

    def failing(bundle, encoded, cfg, **kw):
        if any(e.key.startswith("bad:") for e in encoded):
            raise UrtError("generation failed for this group")
        return fake(bundle, encoded, cfg, **kw)

    monkeypatch.setattr(judge_mod, "generate", failing)
    for i in range(3):
        vqa_image(i).save(tmp_path / f"im{i}.png")
    ims = [f"im{i}.png" for i in range(3)]
    src = _write_groups(tmp_path, [{"key": "ok", "caption": "a", "images": ims},
                                   {"key": "bad", "caption": "b", "images": ims}])
    args = _rank_args([src], tmp_path / "out")
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["groups_ranked"] == 1 and summary["skipped_by_reason"] == {"judge error": 1}
    assert [json.loads(x)["key"] for x in (tmp_path / "out" / "rankings.jsonl").read_text().splitlines()] == ["ok"]
