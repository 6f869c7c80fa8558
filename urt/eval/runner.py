"""Evaluate a model on a benchmark or a shard set: generate judgements, then score them exactly as
`urt eval --predictions` does (`urt.eval.benchmarks.score`).

`run_eval(out, model=..., benchmark=... | shards=..., ...)`:

1. items: the benchmark's own file through the converters (visuals not loaded yet) or the shard
   headers; `limit` keeps the first N;
2. orders: `order="random"` shows each item in one order drawn from (seed, key) — stable across
   restarts and independent of `limit`; `order="both"` shows both orders;
3. generations already in `out/generations.jsonl` (by key + swapped) are kept; only the missing
   ones are generated: items are materialised (videos decoded to `frames` uniformly sampled frames),
   swapped when needed (`Sample.swapped()`), encoded with `SampleEncoder(mode="prompt")` (implicit
   mode: the implicit template set) and generated greedily, `batch_size` prompts per call. Each
   finished line is appended and flushed, so an interrupted run loses nothing it finished;
4. `out/run.json` records what the generations depend on (model, family, mode, template set, max new
   tokens, item source); resuming with different settings is an error, not a silent mix;
5. scoring over the generations this run asked for; `results.json` / `results.md` written.

`generations.jsonl` has the predictions file format (key, output, swapped, task), so it can be
re-scored with `urt eval --predictions`.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterator

from urt.errors import UrtError
from urt.eval.benchmarks import (
    Item,
    Prediction,
    check_benchmark,
    check_mode,
    load_items,
    load_shard_items,
    parse_prediction,
    score,
)
from urt.eval.report import write_results

ORDERS = ("random", "both")
GENERATIONS = "generations.jsonl"
RUN_INFO = "run.json"


def swap_coin(seed: int, key: str) -> bool:
    """Whether `order="random"` shows item `key` swapped: a fair coin drawn from (seed, key) only."""
    return random.Random(f"urt-eval:{int(seed)}:{key}").random() < 0.5


def required_orders(items: list[Item], order: str, seed: int) -> list[tuple[Item, bool]]:
    if order not in ORDERS:
        raise UrtError(f"unknown order {order!r}; known: {', '.join(ORDERS)}")
    if order == "both":
        return [(it, sw) for it in items for sw in (False, True)]
    return [(it, swap_coin(seed, it.key)) for it in items]


def read_generations(path: Path) -> list[Prediction]:
    """Existing generations, for resuming. A last line cut off by a crash (no trailing newline, not
    valid JSON) is dropped from the file; any other bad line is an error naming it."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:])
            data += b"\n"
        except ValueError:
            data = data[:cut]
        with path.open("wb") as f:
            f.write(data)
    out: list[Prediction] = []
    seen: set[tuple[str, bool]] = set()
    for n, raw in enumerate(data.decode("utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as err:
            raise UrtError(f"{path}: line {n}: not valid JSON ({err}); fix or delete the file to resume") from None
        p = parse_prediction(obj, f"{path}: line {n}", n)
        if (p.key, p.swapped) in seen:  # cannot happen with our writer; keep the first
            continue
        seen.add((p.key, p.swapped))
        out.append(p)
    return out


def _fingerprint(**kw) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()}


def source_info(benchmark: str | None, benchmark_file=None, shards=None) -> dict:
    """What results.json records as the judged items' source: the benchmark file or the shard directory, as
    an absolute path (a relative one means nothing once read from another working directory)."""
    if benchmark is not None:
        return {"benchmark_file": str(Path(benchmark_file).resolve()) if benchmark_file else None}
    return {"shards": str(Path(shards).resolve()) if shards else None}


def _check_run_info(out: Path, info: dict, have_generations: bool) -> None:
    path = out / RUN_INFO
    if path.is_file() and have_generations:
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if isinstance(old, dict):
            diff = {k: (old.get(k), v) for k, v in info.items() if old.get(k) != v}
            if diff:
                raise UrtError(f"{out}: existing {GENERATIONS} were made with other settings ("
                               + "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
                               + f"); use another --out or delete {GENERATIONS}")
    path.write_text(json.dumps(info, indent=2) + "\n")


def _decode_videos(sample, frames: int):
    """Materialised benchmark videos are encoded files; the encoder needs frames."""
    from urt.data.schema import Video
    from urt.data.video import decode_video

    if not any(isinstance(v, Video) and v.frames is None for v in sample.visuals):
        return sample
    vis = []
    for i, v in enumerate(sample.visuals):
        if isinstance(v, Video) and v.frames is None:
            info: dict = {}
            imgs, src_fps = decode_video(v.data, where=f"sample {sample.key!r} video {i}", frames=frames, info=info)
            # rate of the kept frames: they span the whole clip uniformly
            n = info.get("total_frames") or 0
            fps = len(imgs) * float(src_fps) / n if src_fps and n else None
            vis.append(Video(frames=imgs, fps=fps))
        else:
            vis.append(v)
    sample.visuals = vis
    return sample


def _benchmark_samples(benchmark: str, path, root, keys: set[str], frames: int) -> Iterator[Any]:
    from urt.data.convert import records
    from urt.data.formats.common import ItemError, materialize

    for rec in records(benchmark, path, root=root):
        if rec.key not in keys:
            continue
        try:
            s = materialize(rec)
        except ItemError as err:
            raise UrtError(f"{rec.origin or rec.key}: {err.message}") from None
        yield _decode_videos(s, frames)


def _shard_samples(directory, keys: set[str], frames: int) -> Iterator[Any]:
    from urt.data.shards import read_shards

    for s in read_shards(directory, frames=frames):
        if s.key in keys:
            yield s


def run_eval(out: str | Path, *, model: str | None = None, family: str | None = None, bundle=None,
             benchmark: str | None = None, benchmark_file: str | Path | None = None,
             root: str | Path | None = None, shards: str | Path | None = None, mode: str = "cot",
             order: str = "random", seed: int = 0, max_new_tokens: int = 1024, batch_size: int = 8,
             limit: int | None = None, frames: int | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> dict:
    """Generate (resumably) and score; returns the results dict (also written to `out`). Pass a
    loaded `bundle` (ModelBundle) or `model` (a path, or "tiny" with `family`). `frames` per video: None
    takes the model folder's trained frames (urt.json), else 8."""
    from urt.models.preprocessing import exported_frames

    if frames is None:
        frames = exported_frames(model)
    check_mode(mode)
    if order not in ORDERS:
        raise UrtError(f"unknown order {order!r}; known: {', '.join(ORDERS)}")
    if (benchmark is None) == (shards is None):
        raise UrtError("evaluate either a benchmark (--benchmark and --benchmark-file) or a shard set (--shards)")
    if benchmark is not None:
        check_benchmark(benchmark)
        if benchmark_file is None:
            raise UrtError(f"--benchmark {benchmark} needs --benchmark-file (the benchmark's own file)")
    if limit is not None and limit < 0:
        raise UrtError(f"limit must be >= 0, got {limit}")
    if bundle is None and model is None:
        raise UrtError("no model given (--model PATH or tiny)")
    log = log or (lambda s: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    items = (load_items(benchmark, benchmark_file, root, limit=limit) if benchmark is not None
             else load_shard_items(shards, limit=limit))
    wanted = required_orders(items, order, seed)
    gen_path = out / GENERATIONS
    existing = read_generations(gen_path)
    have = {(p.key, p.swapped): p for p in existing}
    pending = [(it, sw) for it, sw in wanted if (it.key, sw) not in have]

    model_name = model if model is not None else getattr(bundle, "name", None) or "<bundle>"
    fam = family if family is not None else getattr(bundle, "family", None)
    template_set = "implicit" if mode == "implicit" else None
    info = _fingerprint(model=str(model_name), family=fam, mode=mode, template_set=template_set,
                        max_new_tokens=int(max_new_tokens), frames=int(frames),
                        benchmark=benchmark, benchmark_file=str(Path(benchmark_file).resolve()) if benchmark_file else None,
                        shards=str(Path(shards).resolve()) if shards else None)
    _check_run_info(out, info, bool(existing))
    log(f"{len(items)} item(s), {len(wanted)} judgement(s): {len(wanted) - len(pending)} already generated, "
        f"{len(pending)} to generate")

    n_new = 0
    if pending:
        n_new = _generate_pending(pending, gen_path, bundle=bundle, model=model, family=family, mode=mode,
                                  template_set=template_set, benchmark=benchmark, benchmark_file=benchmark_file,
                                  root=root, shards=shards, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  seed=seed, frames=frames, progress=progress)
        existing = read_generations(gen_path)
        have = {(p.key, p.swapped): p for p in existing}

    preds = [have[(it.key, sw)] for it, sw in wanted if (it.key, sw) in have]
    run = {"model": str(model_name), "family": fam, "order": order, "seed": seed, "max_new_tokens": max_new_tokens,
           "limit": limit, "generated_now": n_new, "reused": len(preds) - n_new,
           "ignored_generations": len(existing) - len(preds)}
    src = source_info(benchmark, benchmark_file, shards)
    res = score(items, preds, benchmark=benchmark, mode=mode,
                info={**src, "predictions": str(gen_path), "run": run})
    write_results(res, out)
    return res


def _generate_pending(pending: list[tuple[Item, bool]], gen_path: Path, *, bundle, model, family, mode, template_set,
                      benchmark, benchmark_file, root, shards, max_new_tokens, batch_size, seed, frames,
                      progress) -> int:
    from urt import generation
    from urt.data.encode import SampleEncoder

    if bundle is None:
        from urt.models import load_model

        bundle = load_model(model, family)
    fam = getattr(bundle, "family", family)
    enc = SampleEncoder(bundle.processor, fam, template_set=template_set, mode="prompt")
    cfg = generation.GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=0.0, top_p=1.0,
                                      num_return_sequences=1, batch_size=int(batch_size), seed=int(seed))
    orders: dict[str, list[bool]] = {}
    for it, sw in pending:
        orders.setdefault(it.key, []).append(sw)
    keys = set(orders)
    samples = (_benchmark_samples(benchmark, benchmark_file, root, keys, frames) if benchmark is not None
               else _shard_samples(shards, keys, frames))

    prog = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        prog = Progress(TextColumn("[bold]generating[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=Console(stderr=True))
        prog.start()
        tid = prog.add_task("generating", total=len(pending))
    n_done = 0
    batch: list = []

    def flush(f) -> None:
        nonlocal n_done, batch
        if not batch:
            return
        texts = generation.generate(bundle, [e for e, _ in batch], cfg, progress=False)
        for (e, sw), outs in zip(batch, texts):
            f.write(json.dumps({"key": e.key, "output": outs[0], "swapped": sw, "task": e.task},
                               ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
        n_done += len(batch)
        if prog is not None:
            prog.update(tid, advance=len(batch))
        batch = []

    try:
        with gen_path.open("a", encoding="utf-8") as f:
            seen: set[str] = set()
            for s in samples:
                if s.key in seen:
                    continue
                seen.add(s.key)
                for sw in orders[s.key]:
                    batch.append((enc(s.swapped() if sw else s), sw))
                    if len(batch) >= batch_size:
                        flush(f)
            flush(f)
    finally:
        if prog is not None:
            prog.stop()
    missing = keys - seen
    if missing:
        raise UrtError(f"{len(missing)} item(s) to evaluate were not found when loading visuals (first: "
                       f"{', '.join(sorted(missing)[:5])})")
    return n_done
