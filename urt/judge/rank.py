"""`urt rank`'s engine: JSONL groups -> per-candidate win rates, rankings and DPO pairs.

Input: JSONL files (or folders of `*.jsonl` shards, read in name order), one group per line:

    {"key": "g1", "caption": "a red circle", "images": ["a.png", "b.png", ...]}
    {"key": "g2", "caption": "a dog surfing", "videos": ["a.mp4", "b.mp4", ...]}
    {"key": "g3", "question": "What colour?", "image": "ref.png", "answers": ["red", "blue", ...]}

Relative paths are relative to the JSONL file. Optional fields: `key` (default `FILE:LINE`), `expected` (the
index of a candidate known to be the best: the summary then reports how often it has the top win rate, a
k-way tie at the top counting 1/k, against chance, the mean of 1/N), `meta` (copied to the output).

Output (in `out_dir`):

* `rankings.jsonl` / `rankings.parquet`: per group its win rates, ranking (best first), wins / losses /
  ties / unparsable counts, position consistency, intransitive triples, the pair verdicts;
* `dpo.jsonl` / `dpo.parquet`: chosen / rejected candidates with the margin (win-rate difference);
* `skipped.jsonl`: the groups left out and why (a bad line, a missing or undecodable file, a group the
  judge could not judge: its batch is retried group by group and only the culprit is skipped).

Resumable line by line: a group whose id (`FILE:LINE`) is in rankings.jsonl or skipped.jsonl is not judged
again; a truncated last line (an interrupted write) is dropped. The parquet files are rewritten from the
JSONL at the end of every run. Bad files follow `on_bad`: "skip" the group (named, counted, logged), "drop"
the bad candidates and rank the rest (the group is skipped when fewer than 2 remain), or "fail" (UrtError
naming the file, line and candidate).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from urt.errors import UrtError
from urt.judge.group import DPO_POLICIES, GroupResult, dpo_pairs

log = logging.getLogger(__name__)

ON_BAD = ("skip", "drop", "fail")
RANKINGS, DPO, SKIPPED = "rankings.jsonl", "dpo.jsonl", "skipped.jsonl"


@dataclass
class Line:
    """One input line: where it is, its parsed record (None: not a JSON object) or why it is bad."""

    path: Path
    number: int
    record: dict | None
    error: str | None = None

    @property
    def id(self) -> str:
        return f"{self.path}:{self.number}"


def input_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The JSONL files named by `inputs` (files, or folders whose `*.jsonl` are taken in name order)."""
    out: list[Path] = []
    for x in inputs:
        p = Path(x)
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise UrtError(f"{p}: a folder with no *.jsonl files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise UrtError(f"{p}: no such file or folder")
    if not out:
        raise UrtError("no input files given")
    return out


def read_lines(files: Sequence[Path]) -> Iterator[Line]:
    for path in files:
        path = path.resolve()  # ids (FILE:LINE) must not depend on how the input was spelled
        with open(path, encoding="utf-8") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError as err:
                    yield Line(path, number, None, f"not valid JSON ({err.msg} at column {err.colno})")
                    continue
                if not isinstance(rec, dict):
                    yield Line(path, number, None, f"a JSON {type(rec).__name__}, not an object")
                    continue
                yield Line(path, number, rec)


def _spec(line: Line) -> dict:
    """Validate a record's fields (no file is read): kind, prompt, candidate entries, reference."""
    r = line.record
    kinds = [k for k in ("images", "videos", "answers") if k in r]
    if len(kinds) != 1:
        raise UrtError(f"{line.id}: give exactly one of 'images', 'videos' or 'answers' (a list of candidates)")
    kind = kinds[0]
    cands = r[kind]
    if not isinstance(cands, list) or len(cands) < 2 or not all(isinstance(c, str) for c in cands):
        raise UrtError(f"{line.id}: '{kind}' must be a list of at least 2 strings")
    if kind == "answers":
        if not isinstance(r.get("question"), str):
            raise UrtError(f"{line.id}: 'answers' need a 'question' (string)")
        refs = [k for k in ("image", "video") if isinstance(r.get(k), str)]
        if len(refs) != 1:
            raise UrtError(f"{line.id}: 'answers' need exactly one of 'image' or 'video' (the reference file)")
        prompt = r["question"]
    else:
        if not isinstance(r.get("caption"), str):
            raise UrtError(f"{line.id}: '{kind}' need a 'caption' (string)")
        refs = []
        prompt = r["caption"]
    exp = r.get("expected")
    if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int) or not 0 <= exp < len(cands)):
        raise UrtError(f"{line.id}: 'expected' must be a candidate index in [0, {len(cands)}), got {exp!r}")
    return {"kind": kind, "prompt": prompt, "candidates": cands, "ref_kind": refs[0] if refs else None,
            "ref": r.get(refs[0]) if refs else None, "expected": exp}


def _resolve(base: Path, p: str) -> str:
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else base / q)


@dataclass
class Summary:
    groups: int = 0  # ranked in this run
    resumed: int = 0  # already in the output
    skipped: Counter = field(default_factory=Counter)  # reason -> groups
    dropped_candidates: int = 0
    pairs_judged: int = 0
    dpo_pairs: int = 0
    expected_top1: float = 0.0  # groups whose expected candidate ranks first (a k-way tie at the top: 1/k)
    expected_total: int = 0
    chance: float = 0.0  # sum of 1/N over the groups with an `expected`

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"groups_ranked": self.groups, "groups_resumed": self.resumed,
                               "groups_skipped": sum(self.skipped.values()), "skipped_by_reason": dict(self.skipped),
                               "candidates_dropped": self.dropped_candidates, "verdicts": self.pairs_judged,
                               "dpo_pairs": self.dpo_pairs}
        if self.expected_total:
            out["expected_top1"] = {"matches": self.expected_top1, "groups": self.expected_total,
                                    "rate": self.expected_top1 / self.expected_total,
                                    "chance": self.chance / self.expected_total}
        return out


def _done_ids(path: Path) -> set[str]:
    """Ids recorded in a JSONL output; a truncated last line (an interrupted write) is cut off the file."""
    if not path.is_file():
        return set()
    ids: set[str] = set()
    good = 0
    with open(path, "rb") as f:
        data = f.read()
    for raw in data.splitlines(keepends=True):
        try:
            rec = json.loads(raw)
            ids.add(rec["id"])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            if raw.endswith(b"\n"):
                raise UrtError(f"{path}: a corrupt line in the middle of the output ({raw[:80]!r}); "
                               f"move the file away to start over") from None
            log.warning("urt rank: dropping a truncated last line of %s (an interrupted write)", path)
            break
        good += len(raw)
    if good != len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return ids


def _keep_only(path: Path, ids: set[str]) -> None:
    rows = _rows(path)
    kept = [r for r in rows if r.get("id") in ids]
    if len(kept) != len(rows):
        log.warning("urt rank: dropping %d DPO lines of groups that were not finished", len(rows) - len(kept))
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f if x.strip()]


def write_parquet(out_dir: Path) -> None:
    """rankings.parquet and dpo.parquet from their JSONL (nested fields as lists, verdicts as JSON text)."""
    import pandas as pd

    rank = _rows(out_dir / RANKINGS)
    for r in rank:
        r["pairs"] = json.dumps(r.get("pairs", []), ensure_ascii=False)
        r["meta"] = json.dumps(r.get("meta"), ensure_ascii=False)
    pd.DataFrame(rank).to_parquet(out_dir / "rankings.parquet", index=False)
    dpo = _rows(out_dir / DPO)
    for r in dpo:
        r["meta"] = json.dumps(r.get("meta"), ensure_ascii=False)
    cols = ["id", "key", "kind", "prompt", "reference", "chosen", "rejected", "chosen_index", "rejected_index",
            "margin", "chosen_win_rate", "rejected_win_rate", "meta"]
    pd.DataFrame(dpo, columns=cols).to_parquet(out_dir / "dpo.parquet", index=False)


class Ranker:
    """Ranks the groups of JSONL inputs into `out_dir` (see the module docstring) with a `Judge`."""

    def __init__(self, judge, out_dir: str | Path, *, both_orders: bool = True, pairs_per_candidate: int | None = None,
                 ties: str = "half", dpo: str = "best-worst", min_margin: float = 0.0, on_bad: str = "skip",
                 groups_per_batch: int = 4, verdict_text: bool = True, progress: bool = True):
        if on_bad not in ON_BAD:
            raise UrtError(f"unknown bad-file policy {on_bad!r}; known: {', '.join(ON_BAD)}")
        if dpo not in DPO_POLICIES:
            raise UrtError(f"unknown DPO pair policy {dpo!r}; known: {', '.join(DPO_POLICIES)}")
        if isinstance(groups_per_batch, bool) or int(groups_per_batch) < 1:
            raise UrtError(f"groups_per_batch must be a positive integer, got {groups_per_batch!r}")
        self.judge = judge
        self.out = Path(out_dir)
        self.opts = dict(both_orders=both_orders, pairs_per_candidate=pairs_per_candidate, ties=ties)
        self.dpo, self.min_margin = dpo, float(min_margin)
        self.on_bad = on_bad
        self.groups_per_batch = int(groups_per_batch)
        self.verdict_text = verdict_text
        self.progress = progress

    def _skip(self, line: Line, reason: str, message: str, summary: Summary, f_skip) -> None:
        if self.on_bad == "fail":
            raise UrtError(message if message.startswith(line.id) else f"{line.id}: {message}")
        summary.skipped[reason] += 1
        log.warning("urt rank: skipping a group: %s", message)
        f_skip.write(json.dumps({"id": line.id, "reason": reason, "message": message}, ensure_ascii=False) + "\n")
        f_skip.flush()

    def _load(self, line: Line, spec: dict, summary: Summary, f_skip):
        """(Group, kept candidate indices) or None when the group is skipped."""
        base = line.path.parent
        key = line.record.get("key") if isinstance(line.record.get("key"), str) else line.id
        ref = {}
        if spec["ref_kind"]:
            ref[spec["ref_kind"]] = _resolve(base, spec["ref"])
        cands = spec["candidates"]
        if spec["kind"] != "answers":
            cands = [_resolve(base, c) for c in cands]
        try:
            return self.judge.group(spec["prompt"], cands, kind=spec["kind"], key=key, **ref), list(range(len(cands)))
        except UrtError as err:
            if self.on_bad != "drop" or spec["kind"] == "answers":
                self._skip(line, "bad file", f"{line.id}: {err}", summary, f_skip)
                return None
        keep, loaded = [], []  # drop: load one by one, keep the good ones
        for i, c in enumerate(cands):
            try:
                loaded.append(self.judge.load(spec["kind"], c, f"{line.id}: candidate {i} ({c})"))
                keep.append(i)
            except UrtError as err:
                summary.dropped_candidates += 1
                log.warning("urt rank: dropping a candidate: %s", err)
        if len(keep) < 2:
            self._skip(line, "bad file", f"{line.id}: fewer than 2 candidates could be loaded", summary, f_skip)
            return None
        return self.judge.group(spec["prompt"], loaded, kind=spec["kind"], key=key), keep

    def run(self, inputs: Sequence[str | Path]) -> Summary:
        files = input_files(inputs)
        self.out.mkdir(parents=True, exist_ok=True)
        ranked = _done_ids(self.out / RANKINGS)
        done = ranked | _done_ids(self.out / SKIPPED)
        _done_ids(self.out / DPO)  # cuts a truncated last line
        _keep_only(self.out / DPO, ranked)  # DPO lines of a group interrupted before its rankings line
        summary = Summary()
        total = sum(1 for _ in read_lines(files))
        bar = _bar(total, self.progress)
        pending: list[tuple[Line, dict, Any, list[int]]] = []
        with open(self.out / RANKINGS, "a", encoding="utf-8") as f_rank, \
                open(self.out / DPO, "a", encoding="utf-8") as f_dpo, \
                open(self.out / SKIPPED, "a", encoding="utf-8") as f_skip:
            try:
                for line in read_lines(files):
                    if line.id in done:
                        summary.resumed += 1
                        _advance(bar)
                        continue
                    if line.record is None:
                        self._skip(line, "bad line", f"{line.id}: {line.error}", summary, f_skip)
                        _advance(bar)
                        continue
                    try:
                        spec = _spec(line)
                    except UrtError as err:
                        self._skip(line, "bad line", str(err), summary, f_skip)
                        _advance(bar)
                        continue
                    loaded = self._load(line, spec, summary, f_skip)
                    if loaded is None:
                        _advance(bar)
                        continue
                    pending.append((line, spec, *loaded))
                    if len(pending) >= self.groups_per_batch:
                        self._flush(pending, summary, f_rank, f_dpo, bar, f_skip)
                if pending:
                    self._flush(pending, summary, f_rank, f_dpo, bar, f_skip)
            finally:
                if bar is not None:
                    bar[0].stop()
        write_parquet(self.out)
        return summary

    def _judged(self, pending, summary: Summary, f_skip) -> list:
        """(pending entry, GroupResult) for the groups that could be judged: a batch that fails is retried
        group by group, and a group that fails alone (e.g. a prompt the processor refuses) follows `on_bad`."""
        try:
            return list(zip(pending, self.judge.judge_groups([g for _, _, g, _ in pending], **self.opts)))
        except UrtError as err:
            if len(pending) > 1:
                return [x for p in pending for x in self._judged([p], summary, f_skip)]
            self._skip(pending[0][0], "judge error", f"{pending[0][0].id}: {err}", summary, f_skip)
            return []

    def _flush(self, pending, summary: Summary, f_rank, f_dpo, bar, f_skip) -> None:
        judged = self._judged(pending, summary, f_skip)
        rank_lines, dpo_lines = [], []
        for (line, spec, group, keep), res in judged:
            r, d = self._lines(line, spec, keep, res, summary)
            rank_lines.append(r)
            dpo_lines += d
        # DPO lines first: a group counts as done once its rankings line is written (a resumed run drops
        # DPO lines of groups without one)
        f_dpo.write("".join(dpo_lines))
        f_dpo.flush()
        f_rank.write("".join(rank_lines))
        f_rank.flush()
        for _ in pending:
            _advance(bar)
        pending.clear()

    def _lines(self, line: Line, spec: dict, keep: list[int], res: GroupResult, summary: Summary
               ) -> tuple[str, list[str]]:
        rec = line.record
        key = rec.get("key") if isinstance(rec.get("key"), str) else line.id
        cands = [spec["candidates"][i] for i in keep]  # as given in the input (relative paths stay relative)
        ranking = [keep[c] for c in res.ranking]  # indices into the input's candidate list
        d = res.to_dict(text=self.verdict_text)
        d.pop("meta", None)
        for p in d["pairs"]:
            p["i"], p["j"], p["first"] = keep[p["i"]], keep[p["j"]], keep[p["first"]]
            if isinstance(p["winner"], int):
                p["winner"] = keep[p["winner"]]
        out = {"id": line.id, "key": key, "kind": spec["kind"], "prompt": spec["prompt"],
               "reference": spec["ref"], "candidates": cands, "candidate_index": keep, **d, "ranking": ranking,
               "meta": rec.get("meta")}
        if spec["expected"] is not None:
            out["expected"] = spec["expected"]
            summary.expected_total += 1
            if spec["expected"] in keep:  # k candidates tied at the top: 1/k (the chance a random tie-break picks it)
                best = max(res.win_rates)
                top = [keep[c] for c in range(len(keep)) if res.win_rates[c] == best]
                summary.expected_top1 += (spec["expected"] in top) / len(top)
            summary.chance += 1.0 / len(keep)
        pairs = dpo_pairs(res, policy=self.dpo, min_margin=self.min_margin)
        dpo_lines = []
        for a, b, m in pairs:
            dpo_lines.append(json.dumps({"id": line.id, "key": key, "kind": spec["kind"], "prompt": spec["prompt"],
                                    "reference": spec["ref"], "chosen": cands[a], "rejected": cands[b],
                                    "chosen_index": keep[a], "rejected_index": keep[b], "margin": m,
                                    "chosen_win_rate": res.win_rates[a], "rejected_win_rate": res.win_rates[b],
                                    "meta": rec.get("meta")}, ensure_ascii=False) + "\n")
        summary.groups += 1
        summary.pairs_judged += len(res.pairs)
        summary.dpo_pairs += len(pairs)
        return json.dumps(out, ensure_ascii=False) + "\n", dpo_lines


def _bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    prog = Progress(TextColumn("ranking groups"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn())
    prog.start()
    return prog, prog.add_task("rank", total=total)


def _advance(bar) -> None:
    if bar is not None:
        bar[0].advance(bar[1])
