"""Stage 2: rejection sampling (docs/method.md §Rejection sampling).

The cold-started model writes K CoT judgements for every pair of the preference data. Each trace is
scored with the paper's rewards (docs/method.md §Rewards): a trace is *correct* iff format == 1 and accuracy == 1
(its `<answer>` is exactly `answer_string(task, label)`). Pairs with at least one correct trace become
SFT samples whose `cot` is the kept trace; pairs with none go, unchanged and without a cot, to GRPO
(stage 3) — with `to_grpo="any_wrong"` every pair with at least one wrong trace goes there too (the paper
samples once per pair, so "wrongly judged" has no single reading for K > 1)::

    out_dir/rollouts.jsonl   header line + one line per judged pair (appended and flushed per batch)
    out_dir/sft/             SFT shards (urt.data.shards), `cot` = the kept correct trace(s)
    out_dir/grpo/            GRPO shards: the wrongly judged pairs, no cot
    out_dir/summary.json     per-task and total counts / rates (see `summarize`)

keep: "first" (the first correct of the K), "random" (one correct trace chosen with
Random(seed, key)), "all" (one SFT sample per correct trace, keys `<key>#<i>`, i = the trace's index
among the K).
order: "keep" (as stored) or "random" (each pair presented swapped with p=0.5, decided by
`urt.data.datamodule.swap_decision(seed, 0, key)`, the label following; the SFT sample is then the
swapped pair, since its trace names positions). Tie labels cannot be judged in CoT mode: skipped and
counted. Overlong prompts (> max_length tokens) and prompts the encoder rejects are skipped and counted
(on_error="skip") or raise (on_error="raise").

Resume: a rerun with the same out_dir reads rollouts.jsonl, skips the keys already judged and
generates only the rest; the shards and summary are always rebuilt from rollouts.jsonl and the source
shards at the end, so nothing finished is lost and `keep` may change between runs. The settings that
change rollouts (k, temperature, top_p, max_new_tokens, seed, order, template set, family) are recorded
in the header line and must match on resume. Sampling is seeded per batch (seed, first key of the
batch), so a resumed run is reproducible but not token-identical to an uninterrupted one (batches are
composed differently).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from urt.data.schema import TASKS, Sample
from urt.errors import UrtError

KEEP = ("first", "random", "all")
ORDERS = ("keep", "random")
TO_GRPO = ("all_wrong", "any_wrong")
ON_ERROR = ("skip", "raise")
ROLLOUTS = "rollouts.jsonl"
SUMMARY = "summary.json"
FORMAT_VERSION = 1
# Skip reasons rejection sampling adds to the shard reader's.
SKIP_REASONS = {
    "tie": "tie label: CoT mode cannot answer tie",
    "overlong": "prompt longer than max_length tokens",
    "encode_error": "the encoder rejected the sample",
    "duplicate_key": "a key seen earlier in the source shards",
    "other_task": "task not in `tasks`",
}


@dataclass
class RejectionReport:
    out_dir: Path
    sft_dir: Path
    grpo_dir: Path
    rollouts: Path
    summary: dict
    generated: int  # pairs judged by this run (the rest came from rollouts.jsonl)
    resumed: int  # pairs taken from an earlier run's rollouts.jsonl
    sft_shards: list[Path] = field(default_factory=list)
    grpo_shards: list[Path] = field(default_factory=list)

    def table(self):
        return summary_table(self.summary)


# ----------------------------------------------------------------------------------------- helpers


def _stable_int(*parts: Any) -> int:
    h = hashlib.sha256("\0".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big")


def _kept_indices(correct: Sequence[bool], keep: str, seed: int, key: str) -> list[int]:
    idx = [i for i, c in enumerate(correct) if c]
    if not idx:
        return []
    if keep == "first":
        return idx[:1]
    if keep == "random":
        return [random.Random(f"urt-keep/{seed}/{key}").choice(idx)]
    return idx


def _check_args(k, temperature, top_p, max_new_tokens, batch_size, keep, order, tasks, on_error, max_length,
                to_grpo="all_wrong"):
    for name, v in (("k", k), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UrtError(f"{name} must be a positive integer, got {v!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise UrtError(f"max_length must be a positive integer or null, got {max_length!r}")
    if temperature is None or float(temperature) < 0:
        raise UrtError(f"temperature must be >= 0, got {temperature!r}")
    if float(temperature) == 0 and k > 1:
        raise UrtError(f"temperature 0 (greedy) with k={k} gives {k} identical traces; sample with temperature > 0")
    if top_p is None or not 0 < float(top_p) <= 1:
        raise UrtError(f"top_p must be in (0, 1], got {top_p!r}")
    if keep not in KEEP:
        raise UrtError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
    if order not in ORDERS:
        raise UrtError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if to_grpo not in TO_GRPO:
        raise UrtError(f"to_grpo must be one of {', '.join(TO_GRPO)}, got {to_grpo!r}")
    if on_error not in ON_ERROR:
        raise UrtError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if tasks is not None:
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise UrtError(f"tasks must be a non-empty subset of {', '.join(TASKS)} (or null), got {list(tasks)!r}")


def _source_total(shards) -> int | None:
    from urt.data.shards import expected_counts, resolve_shards

    try:
        urls = resolve_shards(shards)
        counts = expected_counts(urls)
    except UrtError:
        return None
    return sum(counts.values()) if len(counts) == len(urls) else None


# ---------------------------------------------------------------------------------------- rollouts


def _load_rollouts(path: Path, settings: dict, resume: bool) -> dict[str, int]:
    """The records of an earlier run as {key: byte offset of its line} (records hold K completions
    each, so only offsets stay in memory); writes a fresh header when there is none. A partial last line
    (a crash mid-write) is cut off."""
    if path.exists() and resume and path.stat().st_size > 0:
        raw = path.read_bytes()
        if not raw.endswith(b"\n"):  # torn last line: drop it so appends start on a clean line
            cut = raw.rfind(b"\n") + 1
            with open(path, "r+b") as f:
                f.truncate(cut)
            raw = raw[:cut]
        lines = raw.split(b"\n")[:-1]
        if not lines:
            return _fresh(path, settings)
        try:
            head = json.loads(lines[0])
        except ValueError:
            head = None
        if not isinstance(head, dict) or head.get("urt_rollouts") != FORMAT_VERSION:
            raise UrtError(f"{path}: not a urt rollouts file (bad header line); move it away or pass resume=False")
        old = head.get("settings", {})
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            what = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
            raise UrtError(f"{path}: cannot resume, the rollouts were sampled with other settings ({what}); "
                           f"use another out_dir or resume=False to start over")
        done: dict[str, int] = {}
        offset = len(lines[0]) + 1
        for n, line in enumerate(lines[1:], start=2):
            try:
                key = json.loads(line)["key"]
            except (ValueError, KeyError, TypeError) as err:
                raise UrtError(f"{path}:{n}: not a rollout record ({err}); fix or remove the line to resume") from None
            done[key] = offset
            offset += len(line) + 1
        return done
    return _fresh(path, settings)


def _fresh(path: Path, settings: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"urt_rollouts": FORMAT_VERSION, "settings": settings}) + "\n")
    return {}


def _append(path: Path, records: list[dict], done: dict[str, int]) -> None:
    """Append records (one JSON line each), flush and fsync; note each line's offset in `done`."""
    with open(path, "ab") as f:
        offset = f.seek(0, os.SEEK_END)
        for rec in records:
            line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
            f.write(line)
            done[rec["key"]] = offset
            offset += len(line)
        f.flush()
        os.fsync(f.fileno())


def _read_record(fh, offset: int) -> dict:
    fh.seek(offset)
    return json.loads(fh.readline())


def score_completions(completions: Sequence[str], solution: str, tokenizer=None) -> dict:
    """The rollout record fields for one pair's completions: rewards, correctness and token lengths (the
    sampled tokens, stop token included, of a `urt.generation.Completion`; plain text is re-tokenised) and,
    for completions that carry it, whether each was cut at max_new_tokens."""
    from urt.rewards import accuracy_reward, format_reward

    fmt = [float(format_reward(c, solution)) for c in completions]
    acc = [float(accuracy_reward(c, solution)) for c in completions]
    out = {"rewards": {"format": fmt, "accuracy": acc},
           "correct": [f == 1.0 and a == 1.0 for f, a in zip(fmt, acc)]}
    sampled = all(getattr(c, "ids", None) for c in completions)
    if sampled:
        out["lengths"] = [len(c.ids) for c in completions]
        out["truncated"] = [c.finish_reason == "length" for c in completions]
    elif tokenizer is not None:
        out["lengths"] = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]
    return out


# ----------------------------------------------------------------------------------------- summary


def _empty_stats() -> dict:
    return {"pairs": 0, "traces": 0, "correct_traces": 0, "format_ok": 0, "all_wrong": 0, "tokens": 0,
            "sft_pairs": 0, "sft_samples": 0, "grpo_pairs": 0, "skipped": Counter()}


def _finish(st: dict) -> dict:
    t, p = st["traces"], st["pairs"]
    return {
        "pairs": p,
        "traces": t,
        "correct_traces": st["correct_traces"],
        "accuracy": st["correct_traces"] / t if t else None,
        "format_rate": st["format_ok"] / t if t else None,
        "all_wrong": st["all_wrong"],
        "all_wrong_rate": st["all_wrong"] / p if p else None,
        "mean_completion_tokens": st["tokens"] / t if t else None,
        "sft_pairs": st["sft_pairs"],
        "sft_samples": st["sft_samples"],
        "grpo_pairs": st["grpo_pairs"],
        "skipped": dict(sorted(st["skipped"].items())),
    }


def summary_table(summary: dict):
    """A rich Table of a summary.json dict (one row per task, then the total)."""
    from rich.table import Table

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    from rich import box

    skipped = ", ".join(f"{r} {n}" for r, n in summary["total"]["skipped"].items()) or "none"
    table = Table(title=f"rejection sampling (k={summary['settings']['k']}, keep={summary['settings']['keep']})",
                  caption=f"skipped: {skipped}", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    # acc = correct traces / traces; all wrong = pairs without a correct trace / pairs; tokens = mean per trace
    for col in ("task", "pairs", "acc", "format", "all wrong", "tokens", "SFT", "SFT smp", "GRPO"):
        table.add_column(col, justify="left" if col == "task" else "right", no_wrap=True)
    rows = list(summary["tasks"].items()) + [("total", summary["total"])]
    for name, s in rows:
        tok = "-" if s["mean_completion_tokens"] is None else f"{s['mean_completion_tokens']:.1f}"
        table.add_row(name, str(s["pairs"]), pct(s["accuracy"]), pct(s["format_rate"]), pct(s["all_wrong_rate"]),
                      tok, str(s["sft_pairs"]), str(s["sft_samples"]), str(s["grpo_pairs"]),
                      style="bold" if name == "total" else None)
    return table


# ------------------------------------------------------------------------------------------- main


def rejection_sample(bundle, shards, out_dir, *, k: int = 4, temperature: float = 1.0, top_p: float = 1.0,
                     max_new_tokens: int = 1024, batch_size: int = 8, keep: str = "first", seed: int = 0,
                     template_set: str | None = None, order: str = "keep", tasks: Sequence[str] | None = None,
                     max_length: int | None = None, on_error: str = "skip", progress: bool = True,
                     resume: bool = True, read: dict | None = None, maxcount: int = 1000,
                     limit: int | None = None, to_grpo: str = "all_wrong") -> RejectionReport:
    """Judge every pair of `shards` K times with `bundle` and split the pairs into SFT data (a correct
    trace exists) and GRPO data (none, or with `to_grpo="any_wrong"` not all); see the module docstring. `read`: extra keyword arguments of
    `urt.data.shards.read_shards` (frames, min_pixels, max_pixels, ...). Returns a RejectionReport;
    writes out_dir/{rollouts.jsonl, sft/, grpo/, summary.json}. `limit`: judge only the first `limit` pairs
    (of the selected tasks) in shard order; the rest are not read. `to_grpo`: which pairs go to GRPO —
    "all_wrong" (none of the K traces correct) or "any_wrong" (at least one wrong: such a pair can give an
    SFT sample and a GRPO prompt, and its GRPO groups are the ones likely to have reward variance)."""
    from urt.data.datamodule import swap_decision
    from urt.data.encode import OverlongSample, SampleEncoder
    from urt.data.shards import SkipStats, read_shards, write_shards
    from urt.generation import GenerationConfig, generate
    from urt.prompts import answer_string

    tasks = list(tasks) if tasks is not None else None
    _check_args(k, temperature, top_p, max_new_tokens, batch_size, keep, order, tasks, on_error, max_length, to_grpo)
    seed = int(seed)
    read = dict(read or {})
    encoder = SampleEncoder(bundle.processor, bundle.family, template_set=template_set, mode="prompt",
                            max_length=max_length)
    settings = {"k": k, "temperature": float(temperature), "top_p": float(top_p), "max_new_tokens": max_new_tokens,
                "seed": seed, "order": order, "template_set": encoder.template_set, "family": bundle.family}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rollouts = out / ROLLOUTS
    done = _load_rollouts(rollouts, settings, resume)
    resumed = len(done)
    tokenizer = bundle.tokenizer

    def stream(stats: SkipStats) -> Iterator[Sample]:
        return read_shards(shards, on_error=on_error, stats=stats, **read)

    def skip(reason: str, task: str | None, key: str) -> None:
        skipped[reason] += 1
        if task is not None:
            skipped_by_task.setdefault(task, Counter())[reason] += 1

    # ---- pass 1: generate for every pair not in rollouts.jsonl
    skipped: Counter = Counter()
    skipped_by_task: dict[str, Counter] = {}
    read_stats = SkipStats()
    seen: set[str] = set()
    generated = taken = 0
    if limit is not None and int(limit) < 0:
        raise UrtError(f"limit must be >= 0, got {limit}")
    total = _source_total(shards)
    if limit is not None and total is not None:
        total = min(total, int(limit))
    bar = None
    if progress:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TimeRemainingColumn())
        bar_task = bar.add_task(f"rejection sampling (k={k})", total=total)
        bar.start()

    pending: list[tuple[Sample, Any, bool]] = []  # (sample as presented, its encoding, swapped)

    def flush_batch() -> None:
        nonlocal generated
        if not pending:
            return
        first = pending[0][0].key
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                               num_return_sequences=k, batch_size=batch_size,
                               seed=_stable_int("urt-rejection", seed, first) % (2 ** 31))
        outs = generate(bundle, [enc for _, enc, _ in pending], cfg, progress=False)
        if len(outs) != len(pending):
            raise UrtError(f"generate returned {len(outs)} results for {len(pending)} prompts")
        records = []
        for (s, _, swapped), comps in zip(pending, outs):
            comps = list(comps)
            if len(comps) != k:
                raise UrtError(f"generate returned {len(comps)} completions for {s.key!r}, expected {k}")
            rec = {"key": s.key, "task": s.task, "label": int(s.label), "swapped": swapped,
                   "completions": comps}
            rec.update(score_completions(comps, answer_string(s.task, int(s.label)), tokenizer))
            records.append(rec)
        _append(rollouts, records, done)
        generated += len(records)
        if bar is not None:
            bar.advance(bar_task, len(records))
        pending.clear()

    try:
        for s in stream(read_stats):
            if s.key in seen:
                if on_error == "raise":
                    raise UrtError(f"duplicate sample key {s.key!r} in {shards}")
                skip("duplicate_key", s.task, s.key)
                if bar is not None:
                    bar.advance(bar_task, 1)
                continue
            seen.add(s.key)
            reason = None
            if tasks is not None and s.task not in tasks:
                reason = "other_task"
            elif s.label == "tie":
                reason = "tie"
            if reason is not None:
                skip(reason, s.task, s.key)
                if bar is not None:
                    bar.advance(bar_task, 1)
                continue
            if limit is not None and taken >= limit:
                break
            taken += 1
            if s.key in done:  # judged by an earlier run
                if bar is not None:
                    bar.advance(bar_task, 1)
                continue
            swapped = order == "random" and swap_decision(seed, 0, s.key)
            shown = s.swapped() if swapped else s
            try:
                enc = encoder(shown)
            except OverlongSample:
                if on_error == "raise":
                    raise
                skip("overlong", s.task, s.key)
                if bar is not None:
                    bar.advance(bar_task, 1)
                continue
            except UrtError:
                if on_error == "raise":
                    raise
                skip("encode_error", s.task, s.key)
                if bar is not None:
                    bar.advance(bar_task, 1)
                continue
            pending.append((shown, enc, swapped))
            if len(pending) >= batch_size:
                flush_batch()
        flush_batch()
    finally:
        if bar is not None:
            bar.stop()

    # ---- pass 2: shards + summary from rollouts.jsonl and the source samples
    per_task: dict[str, dict] = {}
    tot = _empty_stats()
    for t, c in skipped_by_task.items():
        per_task.setdefault(t, _empty_stats())["skipped"].update(c)
    tot["skipped"].update(skipped)
    for r, n in read_stats.skipped.items():
        tot["skipped"][f"read:{r}"] += n

    judged: set[str] = set()

    def pairs() -> Iterator[tuple[Sample, dict]]:
        seen2: set[str] = set()
        for s in stream(SkipStats()):
            if s.key in seen2:
                continue
            seen2.add(s.key)
            off = done.get(s.key)
            if off is None or s.label == "tie" or (tasks is not None and s.task not in tasks):
                continue
            yield s, _read_record(fh, off)

    sft_dir, grpo_dir = out / "sft", out / "grpo"
    grpo_keys: list[str] = []
    grpo_correct: dict[str, int] = {}

    def sft_stream() -> Iterator[Sample]:
        for s, rec in pairs():
            judged.add(s.key)
            st = per_task.setdefault(s.task, _empty_stats())
            correct = rec["correct"]
            n_ok = sum(bool(c) for c in correct)
            for d in (st, tot):
                d["pairs"] += 1
                d["traces"] += len(correct)
                d["correct_traces"] += n_ok
                d["format_ok"] += sum(1 for f in rec["rewards"]["format"] if f == 1.0)
                d["tokens"] += sum(rec.get("lengths") or [])
                d["all_wrong"] += n_ok == 0
                d["sft_pairs"] += n_ok > 0
            if n_ok == 0 or (to_grpo == "any_wrong" and n_ok < len(correct)):
                grpo_keys.append(s.key)
                grpo_correct[s.key] = n_ok
                st["grpo_pairs"] += 1
                tot["grpo_pairs"] += 1
            if n_ok == 0:
                continue
            base = s.swapped() if rec.get("swapped") else s
            if int(base.label) != int(rec["label"]):
                raise UrtError(f"{rollouts}: key {s.key!r} was judged with label {rec['label']} but the source now "
                               f"says {s.label}; the source shards changed since sampling")
            kept = _kept_indices(correct, keep, seed, s.key)
            for i in kept:
                meta = dict(base.meta, rejection={"trace": i, "correct": n_ok, "k": len(correct)})
                key = f"{s.key}#{i}" if keep == "all" else s.key
                yield Sample(key, base.task, base.label, list(base.visuals), caption=base.caption,
                             question=base.question, answers=base.answers, cot=rec["completions"][i],
                             source=base.source, meta=meta)
                st["sft_samples"] += 1
                tot["sft_samples"] += 1

    wanted = set()

    def grpo_stream() -> Iterator[Sample]:
        for s, rec in pairs():
            if s.key not in wanted:
                continue
            n = len(rec["correct"])
            yield Sample(s.key, s.task, s.label, list(s.visuals), caption=s.caption, question=s.question,
                         answers=s.answers, cot=None, source=s.source,
                         meta=dict(s.meta, rejection={"correct": grpo_correct[s.key], "k": n}))

    with open(rollouts, "rb") as fh:
        sft_shards = write_shards(sft_stream(), sft_dir, prefix="sft", maxcount=maxcount, overwrite=True)
        wanted.update(grpo_keys)
        grpo_shards = write_shards(grpo_stream(), grpo_dir, prefix="grpo", maxcount=maxcount, overwrite=True)

    summary = {
        "format": "urt-rejection-summary", "version": FORMAT_VERSION,
        "settings": dict(settings, keep=keep, to_grpo=to_grpo, tasks=tasks, max_length=max_length,
                         batch_size=batch_size),
        "tasks": {t: _finish(per_task[t]) for t in TASKS if t in per_task},
        "total": _finish(tot),
        "run": {"generated": generated, "resumed": resumed, "stale_records": len(set(done) - judged)},
        "outputs": {"sft": str(sft_dir), "grpo": str(grpo_dir), "rollouts": str(rollouts)},
    }
    tmp = out / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / SUMMARY)
    report = RejectionReport(out_dir=out, sft_dir=sft_dir, grpo_dir=grpo_dir, rollouts=rollouts, summary=summary,
                             generated=generated, resumed=resumed, sft_shards=sft_shards, grpo_shards=grpo_shards)
    if progress:
        from rich.console import Console

        Console().print(summary_table(summary))
    return report


def run_sample(cfg) -> RejectionReport:
    """Rejection sampling as configured: load `cfg.model` and run `rejection_sample` on `cfg.sample` (sample.shards
    -> sample.out_dir). What `urt sample` and a pipeline's sample step both run; prints the summary and paths."""
    from omegaconf import OmegaConf
    from rich.console import Console

    from urt.models import load_model

    if cfg.get("sample") is None:
        raise UrtError("no `sample` settings in the config: compose it with the sample group (+sample=default)")
    s = OmegaConf.to_container(cfg.sample, resolve=True)
    for key in ("shards", "out_dir"):
        if not s.get(key):
            raise UrtError(f"sample.{key} is not set")
    bundle = load_model(**OmegaConf.to_container(cfg.model, resolve=True))
    progress = bool(s.pop("progress", True))
    report = rejection_sample(bundle, s.pop("shards"), s.pop("out_dir"), progress=progress, **s)
    console = Console()
    if not progress:  # rejection_sample printed the table itself otherwise
        console.print(summary_table(report.summary))
    tot = report.summary["total"]
    console.print(f"judged {tot['pairs']} pair(s) ({report.generated} generated now, {report.resumed} from "
                  f"{report.rollouts})")
    console.print(f"SFT  ({tot['sft_samples']} sample(s) from {tot['sft_pairs']} pair(s)): {report.sft_dir}")
    console.print(f"GRPO ({tot['grpo_pairs']} pair(s)): {report.grpo_dir}")
    console.print(f"summary: {report.out_dir / 'summary.json'}")
    return report
