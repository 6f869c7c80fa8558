"""Benchmark items, prediction files and scoring (docs/method.md §Evaluation).

`load_items(benchmark, path, root=None)` reads a benchmark's own file with the converters
(`load_visuals=False`: labels, keys and meta only) into `Item`s. `read_predictions(path)` reads a
predictions JSONL. `score(items, predictions, benchmark=..., mode=...)` is the one scoring function
both `urt eval --predictions` and the runner use; it returns the results dict written as
`results.json` (schema in `urt.eval.__init__`).

Predictions JSONL, one object per line:

    {"key": "hallucination_pair-1003", "output": "<think>…</think><answer>Answer 1 is better</answer>"}
    {"key": "0", "output": "…", "swapped": true, "task": "video_generation"}

* `key` (string; an integer is taken as its decimal string): the benchmark key (`Item.key`; the
  converters' keys: the row id, `<id>#<n>` for VL-RewardBench's repeated ids, `<format>-<index>`).
* `output`: the raw completion (what the model wrote after the assistant turn opened).
* `swapped` (default false): the model saw the candidates in reverse order, so its winner maps back
  (1 <-> 2; a tie stays a tie).
* `task` (optional): checked against the item's task.

Rules: a line that is not a JSON object with these fields is an error naming the line number; a
repeated (key, swapped) is an error naming the key. Predictions whose key is not in the benchmark
are not scored and are listed (`unknown_keys`, first 20, plus the count).

Missing predictions (decision): an item with no prediction in either order is *missing*. The
headline numbers (accuracy, tau, diff, groups, macro) are over the judgements that exist, i.e. over
predicted items — so a partial file still gives meaningful numbers — and results always carry the
missing count, the first missing keys and `accuracy_missing_as_wrong` (every missing item counted as
one wrong judgement). `complete` is false and `results.md` warns whenever anything is missing: a
partial run is never silently reported as the benchmark number.

Parsing: mode "cot" uses `parse_output` (the `<answer>` tag; no tag = wrong); mode "implicit" uses
`parse_implicit` (the tag, or the whole output being exactly an answer/tie string). Only the item's
task's strings count. Format-valid rate: CoT — the paper's format regex matched
(`<think>…</think><answer>…</answer>`); implicit — an answer string was parsed.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from urt.data.formats.benchmarks import VL_GROUPS, VL_SCHEMES, vl_rewardbench_group
from urt.data.schema import GENERATION_TASKS, TASKS
from urt.errors import UrtError
from urt.prompts import parse_implicit, parse_output

SCHEMA = "urt.eval/1"
BENCHMARKS = ("vl_rewardbench", "genai_bench_image", "genai_bench_video", "videogen_rewardbench", "sharegptvideo")
TAU_BENCHMARKS = ("genai_bench_image", "genai_bench_video", "videogen_rewardbench")
MODES = ("cot", "implicit")
LIST_FIRST = 20  # how many missing / unknown keys results list


@dataclass(frozen=True)
class Item:
    """What scoring needs of a benchmark item (no visuals)."""

    key: str
    task: str
    label: Any  # 1, 2 or "tie"
    meta: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Prediction:
    key: str
    output: str
    swapped: bool = False
    task: str | None = None
    line: int = 0  # 1-based line in the predictions file (0: not from a file)


def item_of(x: Any) -> Item:
    """An Item from a Sample, Record, Item or shard header dict."""
    if isinstance(x, Item):
        return x
    if isinstance(x, dict):
        return Item(str(x["key"]), x["task"], x["label"], dict(x.get("meta") or {}))
    return Item(str(x.key), x.task, x.label, dict(getattr(x, "meta", None) or {}))


def check_benchmark(name: str) -> str:
    if name not in BENCHMARKS:
        raise UrtError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return name


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UrtError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    return mode


def load_items(benchmark: str, path: str | Path, root: str | Path | None = None, *,
               limit: int | None = None) -> list[Item]:
    """The benchmark's items from its own file (JSON list / jsonl / parquet / csv, per format), read
    with the converters without loading visuals."""
    from urt.data.convert import convert

    check_benchmark(benchmark)
    recs = convert(benchmark, path, root=root, load_visuals=False, limit=limit)
    return [item_of(r) for r in recs]


def load_shard_items(directory: str | Path, *, limit: int | None = None) -> list[Item]:
    """Items of a shard set from the json headers only (no visual is decoded)."""
    from urt.data.shards import iter_headers

    out = []
    for _, h in iter_headers(directory, on_error="raise"):
        if limit is not None and len(out) >= limit:
            break
        out.append(item_of(h))
    return out


# ----------------------------------------------------------------------------------- predictions
def parse_prediction(obj: Any, where: str, line: int = 0) -> Prediction:
    if not isinstance(obj, dict):
        raise UrtError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    key = obj.get("key")
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    if not isinstance(key, str) or not key:
        raise UrtError(f"{where}: 'key' must be a non-empty string, got {key!r}")
    out = obj.get("output")
    if not isinstance(out, str):
        raise UrtError(f"{where}: 'output' must be a string, got "
                       f"{'nothing' if 'output' not in obj else type(out).__name__}")
    sw = obj.get("swapped", False)
    if not isinstance(sw, bool):
        raise UrtError(f"{where}: 'swapped' must be true or false, got {sw!r}")
    task = obj.get("task")
    if task is not None and task not in TASKS:
        raise UrtError(f"{where}: unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return Prediction(key, out, sw, task, line)


def read_predictions(path: str | Path) -> list[Prediction]:
    """Predictions from a JSONL file (blank lines ignored). Malformed lines and duplicate
    (key, swapped) pairs raise UrtError naming the line / key."""
    p = Path(path)
    if not p.is_file():
        raise UrtError(f"{p}: predictions file not found")
    preds: list[Prediction] = []
    with p.open("r", encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as err:
                raise UrtError(f"{p}: line {n}: not valid JSON ({err.msg})") from None
            preds.append(parse_prediction(obj, f"{p}: line {n}", n))
    check_duplicates(preds, str(p))
    return preds


def check_duplicates(preds: Iterable[Prediction], where: str = "predictions") -> None:
    seen: dict[tuple[str, bool], int] = {}
    for pr in preds:
        k = (pr.key, pr.swapped)
        if k in seen:
            raise UrtError(f"{where}: duplicate prediction for key {pr.key!r} (swapped={pr.swapped}) on lines "
                           f"{seen[k]} and {pr.line}")
        seen[k] = pr.line


# ----------------------------------------------------------------------------------------- scoring
def _flip(w: Any) -> Any:
    return 3 - w if w in (1, 2) else w


def _winner(presented: Any, swapped: bool) -> Any:
    """The winner in the item's original order, from the one said about the order shown."""
    return _flip(presented) if swapped else presented


def _vl_group(item: Item, scheme: str) -> str:
    meta_key = "group" if scheme == "official" else "group_official_script"
    g = item.meta.get(meta_key)
    if g in VL_GROUPS:
        return g
    return vl_rewardbench_group(str(item.meta.get("id", item.key)), scheme)


def _acc_block(acc: PairwiseAccuracy) -> dict:
    from urt.eval.metrics import as_float

    return {"n": int(acc.total), "correct": int(acc.correct), "accuracy": as_float(acc.compute())}


def judgement_outcomes(items: Iterable[Any], predictions: Iterable[Prediction], *, mode: str = "cot"
                       ) -> dict[tuple[str, bool], bool]:
    """(key, swapped) -> whether that judgement is correct, as PairwiseAccuracy counts it (the parsed winner,
    mapped back to the original order, equals the gold label; no answer is wrong). For paired comparisons of
    two models on the same judgements (`paired_comparison`)."""
    from urt.eval.metrics import NONE, encode_winner

    check_mode(mode)
    parse = parse_output if mode == "cot" else parse_implicit
    by_key = {it.key: it for it in map(item_of, items)}
    out = {}
    for pr in predictions:
        it = by_key.get(pr.key)
        if it is None:
            raise UrtError(f"prediction for key {pr.key!r} (line {pr.line}) matches no item")
        w = encode_winner(_winner(parse(pr.output, it.task).winner, pr.swapped))
        out[(pr.key, pr.swapped)] = w != NONE and w == encode_winner(it.label)
    return out


def paired_comparison(before: dict[tuple[str, bool], bool], after: dict[tuple[str, bool], bool]) -> dict:
    """Two models' outcomes on the same judgements: how many `after` gets right that `before` got wrong
    (gained) and the reverse (lost), and the exact two-sided McNemar p-value of the difference (a binomial
    test on the discordant judgements): whether a change of accuracy is more than a few flipped judgements."""
    common = set(before) & set(after)
    gained = sum(after[k] and not before[k] for k in common)
    lost = sum(before[k] and not after[k] for k in common)
    n = gained + lost
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n if n else 1.0
    return {"n": len(common), "gained": gained, "lost": lost, "p_value": min(1.0, 2 * tail)}


def score(items: Iterable[Any], predictions: Iterable[Prediction], *, benchmark: str | None = None,
          mode: str = "cot", info: dict | None = None) -> dict:
    """Score `predictions` against `items` (see `_score`)."""
    with warnings.catch_warnings():  # empty metrics compute NaN -> null; torchmetrics warns about them
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
        return _score(items, predictions, benchmark=benchmark, mode=mode, info=info)


def _score(items: Iterable[Any], predictions: Iterable[Prediction], *, benchmark: str | None = None,
           mode: str = "cot", info: dict | None = None) -> dict:
    """Score `predictions` against `items` (Items, Samples, Records or shard headers). `benchmark`
    picks the benchmark-specific blocks (tau/diff for GenAI/VideoGen, both groupings for
    VL-RewardBench); None = a generic item set (e.g. shards: tau/diff per generation task only).
    Returns the results dict (see `urt.eval`)."""
    # torchmetrics (and the torchvision it pulls in) takes ~9 s to import: only scoring needs it, not `urt --help`
    from urt.eval.metrics import (GroupedAccuracy, PairwiseAccuracy, PositionConsistency, PositionStats, Rate,
                                  TauDiff, as_float)

    check_mode(mode)
    if benchmark is not None:
        check_benchmark(benchmark)
    parse = parse_output if mode == "cot" else parse_implicit
    by_key: dict[str, Item] = {}
    for x in items:
        it = item_of(x)
        if it.key in by_key:
            raise UrtError(f"benchmark items: duplicate key {it.key!r}")
        by_key[it.key] = it
    preds = list(predictions)
    check_duplicates(preds)

    acc = PairwiseAccuracy()
    fmt, parsed = Rate(), Rate()
    pos = PositionStats()
    taudiff = TauDiff()
    task_acc: dict[str, PairwiseAccuracy] = defaultdict(PairwiseAccuracy)
    task_fmt: dict[str, Rate] = defaultdict(Rate)
    task_td: dict[str, TauDiff] = defaultdict(TauDiff)
    vote_acc: dict[str, PairwiseAccuracy] = defaultdict(PairwiseAccuracy)
    groups = {s: GroupedAccuracy(len(VL_GROUPS)) for s in VL_SCHEMES}
    consistency = PositionConsistency()

    unknown: list[str] = []
    orders = Counter()
    winners: dict[str, dict[bool, Any]] = defaultdict(dict)
    rows: list[tuple] = []  # (item, winner, presented, gold_presented, format ok, parsed)
    for pr in preds:
        it = by_key.get(pr.key)
        if it is None:
            unknown.append(pr.key)
            continue
        if pr.task is not None and pr.task != it.task:
            raise UrtError(f"prediction for key {pr.key!r} (line {pr.line}) says task {pr.task!r}, but the "
                           f"benchmark item is {it.task!r}: wrong benchmark file?")
        j = parse(pr.output, it.task)
        presented = j.winner
        winner = _winner(presented, pr.swapped)
        gold_presented = _winner(it.label, pr.swapped)  # the same swap, either way
        winners[it.key][pr.swapped] = winner
        orders["swapped" if pr.swapped else "original"] += 1
        ok_format = j.format_ok if mode == "cot" else j.winner is not None
        rows.append((it, winner, presented, gold_presented, ok_format, j.winner is not None))

    # One batched update per metric (and per task / vote); the metrics only ever see counts.
    def upd(sel: list[tuple], acc_m=None, fmt_m=None, td_m=None) -> None:
        if not sel:
            return
        w = [r[1] for r in sel]
        g = [r[0].label for r in sel]
        if acc_m is not None:
            acc_m.update(w, g)
        if fmt_m is not None:
            fmt_m.update([r[4] for r in sel])
        if td_m is not None:
            td_m.update(w, g)

    upd(rows, acc, fmt, taudiff if benchmark in TAU_BENCHMARKS else None)
    if rows:
        parsed.update([r[5] for r in rows])
        pos.update([r[2] for r in rows], [r[3] for r in rows])
    per_task: dict[str, list] = defaultdict(list)
    per_vote: dict[str, list] = defaultdict(list)
    for r in rows:
        per_task[r[0].task].append(r)
        if benchmark in TAU_BENCHMARKS:
            per_vote[str(r[0].meta.get("vote", r[0].label))].append(r)
    for t, sel in per_task.items():
        upd(sel, task_acc[t], task_fmt[t], task_td[t] if t in GENERATION_TASKS else None)
    for v, sel in per_vote.items():
        upd(sel, vote_acc[v])
    if benchmark == "vl_rewardbench" and rows:
        for s in VL_SCHEMES:
            groups[s].update([r[1] for r in rows], [r[0].label for r in rows],
                             [VL_GROUPS.index(_vl_group(r[0], s)) for r in rows])

    both = [w for w in winners.values() if False in w and True in w]
    if both:
        consistency.update([w[False] for w in both], [w[True] for w in both])

    missing = [k for k in by_key if k not in winners]
    n_judged = int(acc.total)
    res: dict[str, Any] = {
        "schema": SCHEMA,
        "benchmark": benchmark,
        "mode": mode,
        **(info or {}),
        "complete": not missing,
        "counts": {
            "items": len(by_key),
            "items_predicted": len(winners),
            "judgements": n_judged,
            "orders": {"original": orders["original"], "swapped": orders["swapped"]},
            "both_orders": int(consistency.pairs),
            "missing": len(missing),
            "missing_keys": missing[:LIST_FIRST],
            "unknown": len(unknown),
            "unknown_keys": unknown[:LIST_FIRST],
        },
        "accuracy": as_float(acc.compute()),
        "correct": int(acc.correct),
        "accuracy_missing_as_wrong": (int(acc.correct) / (n_judged + len(missing))
                                      if n_judged + len(missing) else None),
        "format_valid_rate": as_float(fmt.compute()),
        "answer_parsed_rate": as_float(parsed.compute()),
    }
    if benchmark in TAU_BENCHMARKS:
        td = taudiff.compute()
        res["tau"] = None if mode == "cot" else as_float(td["tau"])
        res["diff"] = as_float(td["diff"])
        res["tau_diff_counts"] = {"all": int(taudiff.tau_total), "all_correct": int(taudiff.tau_correct),
                                  "non_tie": int(taudiff.diff_total), "non_tie_correct": int(taudiff.diff_correct)}
        if mode == "cot":
            res["tau_note"] = "CoT mode has no tie answer, so tau is not reported"
        res["by_vote"] = {v: _acc_block(a) for v, a in sorted(vote_acc.items())}
    if benchmark == "vl_rewardbench":
        res["vl_rewardbench"] = {}
        for s in VL_SCHEMES:
            g = groups[s]
            accs = g.compute()
            res["vl_rewardbench"][s] = {
                "groups": {name: {"n": int(g.total[i]), "correct": int(g.correct[i]), "accuracy": as_float(accs[i])}
                           for i, name in enumerate(VL_GROUPS)},
                "overall": as_float(acc.compute()),
                "macro": as_float(g.macro()),
            }
        res["vl_rewardbench"]["note"] = (
            "official: hallucination = hallucination_pair (POVID) + RLAIF + RLHF, reasoning = mathverse + mmmu, "
            "general = the rest (183/749/318 items); official_script: as the official eval script counted, "
            "POVID items in general (631/301/318), how the paper's 73.8 was obtained. macro = mean of the "
            "three groups (null when a group has no judgement)")
    by_task = {}
    for t in sorted(task_acc):
        b = _acc_block(task_acc[t])
        b["format_valid_rate"] = as_float(task_fmt[t].compute())
        if t in task_td:
            td = task_td[t].compute()
            b["tau"] = None if mode == "cot" else as_float(td["tau"])
            b["diff"] = as_float(td["diff"])
        by_task[t] = b
    res["by_task"] = by_task
    p = {k: as_float(v) for k, v in pos.compute().items()}
    p["consistency"] = {"pairs": int(consistency.pairs), "consistent": int(consistency.consistent),
                        "rate": as_float(consistency.compute())}
    res["position"] = p
    return res
