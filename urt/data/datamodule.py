"""`RewardDataModule`: the one LightningDataModule every stage uses (shards -> Samples -> order
debiasing -> `SampleEncoder` -> filter -> batch -> collate).

Build it from config and attach the model bundle before fitting::

    dm = hydra.utils.instantiate(cfg.data)      # or RewardDataModule(train_shards=[...], ...)
    dm.attach(bundle)                            # processor, family and model config (the collator)
    trainer.fit(module, datamodule=dm)           # or: for batch in dm.train_dataloader(): ...

Per DataLoader worker (``num_workers`` of them; 0 = the main process is the one worker) the stream is::

    shard list ─ shuffled by (seed, epoch) ─ split by rank (below) ─ split by worker (w::W)
      → urt.data.shards.make_pipeline (tar reading, per-shard count check, shuffle buffer seeded by
        (seed, epoch, rank, worker)) → [by-sample rank split] → tasks filter (header only, before
        decoding) → decode_sample
      → order: keep | random (swap with p=0.5, Random(seed, epoch, key)) | both (the pair, then its swap)
      → SampleEncoder (never truncates: OverlongSample is filtered and counted as "overlong"; with
        ``cache_encoded`` a train sample is encoded once and kept for the later epochs)
      → batches: "padded" = batch_size samples; "packed" = consecutive samples greedily while
        ≤ batch_size samples and ≤ max_tokens_per_batch tokens → collator (urt.data.collate)
      → train, padded, ``group_by_length=k`` > 1: each window of k·batch_size consecutive samples is
        sorted by length and cut into k batches, emitted in a seeded shuffled order (the demo's shard sets
        at k=8: 2-12% extra tokens for padding instead of 14-82%; a window's batches come from the same
        stretch of the shuffled stream)

The DataLoader interleaves the workers' batches round-robin, so the same seed and the same
num_workers give the same batches in the same order on every run.

**Several ranks (DDP).** When the shards divide evenly over the ranks (their number is a multiple of the
world size) each rank reads its own shards (``rank::world``). Otherwise — fewer shards than ranks (one
shard: all but one rank would get nothing), or 3 shards on 2 ranks — every rank reads every shard of its
worker and keeps every world-th sample (raw stream index ``i % world == rank``, the shuffle buffer then
seeded without the rank, so the ranks agree on the order and split it exactly): shares differ by at most
one sample per worker, at the price of each rank reading (not decoding) the others' samples. Under a
Trainer the train loader also keeps the ranks' batch counts equal, which DDP needs (every step is a
collective; a rank that runs out first would leave the others waiting for ever at the next gradient
all-reduce): before each batch the ranks agree (one all-reduce) that every one of them has a batch, and
the epoch ends for all when one has run out; what the others have left is counted as skipped
(``uneven_ranks``), never silently dropped. Packing, the tasks filter and skipped samples make exact
shares impossible in general, so this holds whatever the split.

**Nothing is dropped silently.** Reader skips (corrupt images, truncated tars, …, see
urt.data.shards.REASONS) plus "overlong" and "encode_error" are counted per worker and sent to the
main process with the batch they precede (``batch["_stream"]``, removed before the batch reaches the
model); a worker's remaining counts arrive in a final stats-only message. They add up per epoch to
``dm.skip_stats`` (``dm.summary()``); at epoch end they are logged (``data/train/skipped/<reason>``) to
the trainer's logger, and as a warning when anything was skipped. With ``on_error="raise"`` the first
bad sample raises (a ShardError naming shard and key, an OverlongSample naming the key).

**Resumable position.** ``state_dict()`` (Lightning saves it in every checkpoint) holds the epoch and,
per worker, the position of the next sample in that worker's deterministic stream, plus the number of
batches consumed and which worker served the last one. After ``load_state_dict`` the train loader skips
each worker's consumed raw samples *before decoding* and resumes the round-robin at the right worker, so
the resumed run sees exactly the batches the uninterrupted one would have. The data epoch advances
when a pass over the shards is exhausted (not with ``trainer.current_epoch``). A batch counts as consumed
when the training step receives it (``on_before_batch_transfer`` under a Trainer; when it is yielded in
a trainer-free loop), so Lightning's one-batch prefetch is not counted. Under ``group_by_length`` a cursor
inside a window is (window start, batches of it consumed): the resumed stream rebuilds the window and
skips those batches; the window's counts come with its last batch. Resuming needs the same shards,
seed, num_workers and world size (checked).

val/test loaders read their shards in order (no shuffling), split the same way, with ``val_order``
(default "both": every pair in both orders, the position-debiased evaluation).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import warnings
import zlib
from collections import Counter
from typing import Any, Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from urt.data.cache import EncodedCache, UnitCollector, unpack_into
from urt.data.encode import OverlongSample, SampleEncoder
from urt.data.schema import TASKS, Sample
from urt.data.shards import ShardError, SkipStats, decode_sample, loading_options, make_pipeline, resolve_shards
from urt.errors import UrtError

log = logging.getLogger(__name__)

ORDERS = ("keep", "random", "both")
COLLATE_KINDS = ("auto", "padded", "packed")
STATE_VERSION = 1
# Reasons the data module adds to urt.data.shards.REASONS.
REASONS = {
    "overlong": "longer than max_length (or than max_tokens_per_batch when packing); never truncated",
    "encode_error": "the encoder rejected the sample (e.g. target 'cot' without a CoT, a tie label "
                    "without a tie string, a processor error)",
    "uneven_ranks": "left on this rank when another rank's share of the epoch ran out (DDP ranks must take "
                    "the same number of steps); read again in later epochs",
}
_BEFORE = -1  # sub-position of events observed before a raw sample arrives


def _identity(x):
    return x


def _stats_from_dict(d: dict | None) -> SkipStats:
    st = SkipStats()
    if d:
        st.ok = int(d.get("ok", 0))
        st.skipped.update(d.get("skipped", {}))
        st.examples = {k: list(v) for k, v in d.get("examples", {}).items()}
    return st


def _stable_int(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def swap_decision(seed: int, epoch: int, key: str) -> bool:
    """order="random": whether sample `key` is presented swapped in `epoch`. A fresh generator seeded by
    (seed, epoch, key), so the choice does not depend on workers, ranks or the order samples arrive in."""
    return random.Random(f"urt-order/{seed}/{epoch}/{key}").random() < 0.5


class _Ledger:
    """A worker's skip/ok counts tagged with stream positions ``(raw index, unit)``, handed out with
    the first batch whose resume cursor lies past them (so a resumed run counts each event once)."""

    def __init__(self):
        self.events: list[tuple[tuple[int, int], SkipStats]] = []
        self.excluded: list[tuple[int, int]] = []

    def add(self, pos: tuple[int, int], stats: SkipStats) -> None:
        if stats.ok or stats.skipped:
            self.events.append((pos, stats))

    def skip(self, pos: tuple[int, int], err: ShardError) -> None:
        st = SkipStats()
        st.record(err)
        self.add(pos, st)

    def ok(self, pos: tuple[int, int]) -> None:
        st = SkipStats()
        st.ok = 1
        self.add(pos, st)

    def take(self, before: tuple[int, int] | None = None) -> tuple[dict, int]:
        keep, out = [], SkipStats()
        for pos, st in self.events:
            (out.merge(st) if before is None or pos < before else keep.append((pos, st)))
        self.events = keep
        n_ex = sum(1 for p in self.excluded if before is None or p < before)
        self.excluded = [p for p in self.excluded if not (before is None or p < before)]
        return out.as_dict(), n_ex


class ShardStream(IterableDataset):
    """The per-worker stream described in the module docstring; yields collated batches (dicts with a
    ``_stream`` entry: split, epoch, worker, resume cursor, counts) and, at the end of a worker's
    stream, one stats-only message (``_stream["final"]``). Iterate it through the data module's loaders,
    which remove ``_stream`` and keep the counts."""

    def __init__(self, urls: list[str], *, split: str, encoder: SampleEncoder, collator, batch_size: int,
                 collate: str, max_tokens_per_batch: int | None, shuffle: bool, shuffle_buffer: int, seed: int,
                 order: str, tasks: Sequence[str] | None, on_error: str, drop_last: bool, load_opts: dict,
                 group_by_length: int = 0, cache: EncodedCache | None = None):
        self.urls = list(urls)
        self.split = split
        self.encoder = encoder
        self.collator = collator
        self.batch_size = int(batch_size)
        self.packed = collate == "packed"
        self.max_tokens = max_tokens_per_batch
        self.shuffle = shuffle
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.order = order
        self.tasks = set(tasks) if tasks else None
        self.on_error = on_error
        self.drop_last = drop_last
        self.load_opts = load_opts
        self.group = int(group_by_length) if not self.packed and int(group_by_length) > 1 else 0
        # cache_encoded: (shard, raw key) -> {"key": sample key, swapped?: Encoded}, kept across epochs (an
        # EncodedCache in the main process; in a worker a UnitCollector that sends the units with each batch)
        self.cache = cache
        # Set by the loader (main process) before each iteration; workers get copies.
        self.epoch = 0
        self.rank, self.world = 0, 1
        self.offset = 0  # physical worker i plays logical worker (i + offset) % W (resume)
        self.starts: dict[int, tuple[int, ...]] = {}  # (raw index, unit[, batches of the window consumed])

    # ------------------------------------------------------------------------------------ sharding
    @property
    def by_sample(self) -> bool:
        """Whether the ranks split the samples rather than the shards: when the shards do not divide
        evenly over the ranks (see the module docstring)."""
        return self.world > 1 and len(self.urls) % self.world != 0

    def shards_for(self, worker: int, num_workers: int) -> list[str]:
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"urt-shards/{self.seed}/{self.epoch}").shuffle(urls)
        if not self.by_sample:
            urls = urls[self.rank :: self.world]
        return urls[worker::num_workers]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        n = info.num_workers if info is not None else 1
        w = ((info.id if info is not None else 0) + self.offset) % n
        yield from self._stream(w, n)

    # ------------------------------------------------------------------------------------ the stream
    def _swaps(self, key: str) -> list[bool]:
        """Whether each unit of the sample with this key is its swapped pair."""
        if self.order == "keep":
            return [False]
        if self.order == "both":
            return [False, True]
        return [swap_decision(self.seed, self.epoch, key)]

    def _next_pos(self, pos: tuple[int, int]) -> tuple[int, int]:
        i, sub = pos
        return (i, 1) if self.order == "both" and sub == 0 else (i + 1, 0)

    def _window(self, items: list, start: tuple[int, int], skip: int, w: int, keep_partial: bool):
        """group_by_length: one window of (pos, Encoded) cut into length-sorted batches, in a shuffled order
        seeded by the window's start. Returns [(batch items, cursor, counts-before)] for the batches past the
        first `skip`, and the units dropped by drop_last (the window's last, partial chunk)."""
        ranked = sorted(items, key=lambda x: (len(x[1]), x[0]))
        chunks = [ranked[j:j + self.batch_size] for j in range(0, len(ranked), self.batch_size)]
        dropped = chunks.pop() if not keep_partial and len(chunks[-1]) < self.batch_size else []
        random.Random(f"urt-group/{self.seed}/{self.epoch}/{self.rank}/{w}/{start}").shuffle(chunks)
        end = self._next_pos(items[-1][0])
        # Inside the window the cursor is (window start, batches consumed): a resume rebuilds the window
        # and skips them; the window's counts come with its last batch.
        out = [(chunk, end if j == len(chunks) - 1 else (*start, j + 1), end if j == len(chunks) - 1 else start)
               for j, chunk in enumerate(chunks) if j >= skip]
        return out, dropped

    def _stream(self, w: int, n: int) -> Iterator[dict]:
        resume = tuple(self.starts.get(w, (0, 0)))
        start, skip = resume[:2], (int(resume[2]) if len(resume) > 2 else 0)
        mine = self.shards_for(w, n)
        ledger = _Ledger()
        base = {"split": self.split, "epoch": self.epoch, "worker": w}
        if not mine:
            return
        gstats = SkipStats()  # the reader's counts; drained after every raw sample
        ds = make_pipeline(mine, shuffle_buffer=self.shuffle_buffer if self.shuffle else 0,
                           seed=_stable_int("urt-buffer", self.seed, self.epoch,
                                            "all" if self.by_sample else self.rank, w),
                           shardshuffle=False, on_error=self.on_error, stats=gstats, decode=False,
                           **self.load_opts)

        def drain(pos):
            delta = SkipStats()
            delta.merge(gstats)
            delta.ok = 0  # ok is counted per encoded unit below
            gstats.ok, gstats.skipped, gstats.examples = 0, Counter(), {}
            # A fresh stream counts everything, including what the reader reports before its first raw
            # sample (a shard that is empty or not a tar); a resumed one what lies past its cursor.
            if pos >= start or start == (0, 0):
                ledger.add(pos, delta)

        buf: list = []  # (pos, Encoded)
        tokens = 0
        window_start = start  # group_by_length: where the window in `buf` began

        def emit(items, cursor=None, before=None):
            cursor = cursor or self._next_pos(items[-1][0])
            batch = self.collator([e for _, e in items])
            counts, excluded = ledger.take(before=before or cursor)
            batch["_stream"] = dict(base, cursor=list(cursor), counts=counts, excluded=excluded,
                                    n=len(items))
            if isinstance(self.cache, UnitCollector):  # a worker filling the main process's cache
                batch["_stream"]["units"] = self.cache.pack()
            return batch

        def fail(pos, err: ShardError, original: Exception | None = None):
            if self.on_error == "raise":
                raise (original or err)
            ledger.skip(pos, err)

        i = -1
        for i, raw in enumerate(ds):
            drain((i, _BEFORE))
            if i < start[0]:
                continue
            if self.by_sample and i % self.world != self.rank:
                continue  # another rank's sample
            url = str(raw.get("__url__", "?"))
            if self.tasks is not None:
                try:
                    task = json.loads(raw["json"]).get("task")
                except Exception:
                    task = None  # decode_sample reports the bad header
                if task in TASKS and task not in self.tasks:
                    ledger.excluded.append((i, 0))
                    continue
            cached = self.cache.get((url, raw.get("__key__"))) if self.cache is not None else None
            sample = None
            if cached is None:
                try:
                    sample = decode_sample(raw, **self.load_opts)
                except ShardError as err:
                    fail((i, 0), err)
                    continue
            key = cached["key"] if cached else sample.key
            for sub, swap in enumerate(self._swaps(key)):
                pos = (i, sub)
                if pos < start:
                    continue
                enc = cached.get(swap) if cached else None
                if enc is None:
                    if sample is None:  # cached in the other order only (order=random)
                        sample = decode_sample(raw, **self.load_opts)
                    try:
                        enc = self.encoder(sample.swapped() if swap else sample)
                    except OverlongSample as err:
                        fail(pos, ShardError(url, key, "overlong", f"{err.length} tokens > max_length "
                                                                   f"{err.max_length}"), err)
                        continue
                    except UrtError as err:
                        fail(pos, ShardError(url, key, "encode_error", str(err)), UrtError(f"{url}: {err}"))
                        continue
                    if self.cache is not None:
                        self.cache.put((url, raw.get("__key__")), key, swap, enc)
                if self.packed and self.max_tokens and len(enc) > self.max_tokens:
                    fail(pos, ShardError(url, key, "overlong", f"{len(enc)} tokens > max_tokens_per_batch "
                                                               f"{self.max_tokens}"),
                         OverlongSample(key, len(enc), self.max_tokens))
                    continue
                if self.packed and buf and (len(buf) >= self.batch_size or
                                            (self.max_tokens and tokens + len(enc) > self.max_tokens)):
                    yield emit(buf)
                    buf, tokens = [], 0
                ledger.ok(pos)
                buf.append((pos, enc))
                tokens += len(enc)
                if self.group and len(buf) >= self.group * self.batch_size:
                    for chunk, cursor, before in self._window(buf, window_start, skip, w, keep_partial=True)[0]:
                        yield emit(chunk, cursor, before)
                    window_start, skip = self._next_pos(buf[-1][0]), 0
                    buf = []
                elif not self.group and not self.packed and len(buf) >= self.batch_size:
                    yield emit(buf)
                    buf, tokens = [], 0
        drain((i + 1, _BEFORE))
        if buf and self.group:
            batches, buf = self._window(buf, window_start, skip, w, keep_partial=not self.drop_last)
            for chunk, cursor, before in batches:
                yield emit(chunk, cursor, before)
        elif buf and not (self.drop_last and len(buf) < self.batch_size and not self.packed):
            yield emit(buf)
            buf = []
        counts, excluded = ledger.take()
        if buf:  # dropped by drop_last: not an error, but not silent either
            counts["ok"] -= len(buf)
            counts["skipped"]["dropped_last"] = counts["skipped"].get("dropped_last", 0) + len(buf)
        final = dict(base, final=True, counts=counts, excluded=excluded, n=0)
        if isinstance(self.cache, UnitCollector):
            final["units"] = self.cache.pack()
        yield {"_stream": final}


def _round_robin(streams: list[Iterator[dict]]) -> Iterator[dict]:
    """Items of several streams in turn, leaving out each one as it ends: a DataLoader's order over its
    workers' iterable streams (one item per worker per turn)."""
    live = list(streams)
    while live:
        for it in list(live):
            item = next(it, None)
            if item is None:
                live.remove(it)
            else:
                yield item


class StreamLoader:
    """What the data module's ``*_dataloader()`` return: an iterable over collated batches that wraps a
    fresh ``torch.utils.data.DataLoader`` per iteration (so each epoch's seed and the resume position
    reach the workers) and keeps the stream's counts and position in the data module."""

    def __init__(self, dm: "RewardDataModule", split: str, dataset: ShardStream):
        self.dm = dm
        self.split = split
        self.dataset = dataset

    def _loader(self) -> DataLoader:
        dm = self.dm
        kw: dict[str, Any] = {}
        if dm.num_workers > 0:
            kw["prefetch_factor"] = dm.prefetch_factor
        return DataLoader(self.dataset, batch_size=None, num_workers=dm.num_workers, collate_fn=_identity,
                          pin_memory=dm.pin_memory, persistent_workers=False, **kw)

    def _items(self) -> Iterator[dict]:
        """The stream's items. cache_encoded (train): while the cache is empty the workers encode and send
        their units with each batch (kept here); once it holds units the main process reads the shards itself,
        playing the W workers round-robin as the DataLoader does (the same batches in the same order), so
        that the cached units are used (workers start afresh every epoch, without them)."""
        dm, ds = self.dm, self.dataset
        caching = self.split == "train" and dm.cache_encoded
        if not caching or dm.num_workers == 0:
            ds.cache = dm._encoded if caching else None
            return iter(self._loader())
        if len(dm._encoded) == 0:
            ds.cache = UnitCollector()
            return self._filling(iter(self._loader()))
        ds.cache = dm._encoded
        n = dm.num_workers
        return _round_robin([ds._stream((i + ds.offset) % n, n) for i in range(n)])

    def _filling(self, items: Iterator[dict]) -> Iterator[dict]:
        for item in items:
            units = item["_stream"].pop("units", None)
            if units is not None:
                unpack_into(self.dm._encoded, units)
            yield item

    def __iter__(self) -> Iterator[dict]:
        dm, ds = self.dm, self.dataset
        ds.rank, ds.world = dm._rank_world()
        if self.split == "train":
            dm._begin_train_epoch()
            ds.epoch = dm._epoch
            ds.starts, ds.offset = dm._resume_starts()
            driven = dm.trainer is not None
        else:
            ds.epoch, ds.starts, ds.offset = 0, {}, 0
            dm._eval_stats[self.split] = SkipStats()
            driven = False
        seen = SkipStats().merge(dm._stats) if self.split == "train" else SkipStats()
        # DDP: the ranks take the same number of train batches (module docstring)
        even = self.split == "train" and driven and ds.world > 1
        items = self._items()
        yielded = 0
        while True:
            item = next(items, None)
            if item is not None and item["_stream"].get("final"):
                seen.merge(_stats_from_dict(item["_stream"]["counts"]))
                dm._commit(item["_stream"])
                continue
            if even and not dm._every_rank(item is not None):
                self._leave(item, items, seen)
                break
            if item is None:
                break
            seen.merge(_stats_from_dict(item["_stream"]["counts"]))
            if not driven:
                dm._commit(item.pop("_stream"))
            yielded += 1
            yield item
        dm._end_epoch(self.split, seen)
        if self.split == "train" and yielded == 0 and dm._consumed == 0:
            # A whole pass gave no batch (every shard unreadable, every sample skipped): training on would
            # run zero steps and export the untrained model as if it had trained.
            raise UrtError(f"no training sample could be read from {', '.join(dm.train_shards)} "
                           f"({len(ds.urls)} shard(s)): {seen.summary()}")

    def _leave(self, item: dict | None, rest: Iterator[dict], seen: SkipStats) -> None:
        """Another rank's train share ran out: `item` and the rest of this rank's stream are read to the
        end (so the counts are complete) and their samples counted as skipped ("uneven_ranks"), not
        trained on."""
        left, batches = 0, 0
        for it in itertools.chain([item] if item is not None else [], rest):
            meta = dict(it["_stream"])
            counts = _stats_from_dict(meta["counts"])
            if not meta.get("final"):
                n = int(meta["n"])
                counts.ok -= n
                counts.skipped["uneven_ranks"] += n
                left, batches = left + n, batches + 1
            meta.update(final=True, counts=counts.as_dict())  # accounted, not consumed
            seen.merge(counts)
            self.dm._commit(meta)
        if left:
            note = f"rank {self.dataset.rank}: {left} sample(s) in {batches} batch(es)"
            for st in (seen, self.dm._stats):
                st.examples.setdefault("uneven_ranks", []).append(note)


class RewardDataModule(L.LightningDataModule):
    """One data module for every stage (SFT, rejection sampling, GRPO, evaluation). See the module
    docstring for the pipeline; every argument is a config key of ``conf/data/*.yaml``.

    Args:
        train_shards, val_shards, test_shards: shard dirs / globs / brace patterns / files (or lists);
            test defaults to val.
        batch_size: samples per batch (packed: at most this many samples per packed row).
        max_tokens_per_batch: packed only: the token budget of one packed row (greedy over consecutive
            samples; a sample longer than the budget is counted "overlong").
        collate: "padded" | "packed" (falls back to padded, with a warning, for families that cannot pack) |
            "auto" (resolved in `attach`: packed under flash-attention, padded otherwise — urt.data.collate.packing_pays).
        padding_side: "right" (training, scoring) | "left" (generation).
        num_workers, prefetch_factor, pin_memory: DataLoader options.
        shuffle_buffer: samples in the shuffle buffer (train only; shards are always shuffled per epoch
            in train when shuffle is true).
        shuffle: shuffle shards and samples in train.
        seed: the data seed (shard order, buffer, order="random").
        order, val_order: "keep" | "random" | "both" for train and val/test (position debiasing).
        tasks: keep only these tasks (None: all four).
        mode, target, template_set, max_length: passed to SampleEncoder.
        on_error: "raise" | "skip" (skip and count).
        drop_last: padded train batches only: drop the last incomplete batch of each worker (counted).
        group_by_length: padded train batches only: sort each window of this many batches' samples by length
            before cutting it into batches (emitted in a seeded shuffled order); 0 or 1 = off. Saves the
            padding of mixed shard sets (e.g. 82% -> 12% extra tokens at 8 on the demo's base stage).
        frames, frame_sampling, fps, max_frames, min_pixels, max_pixels, video_min_pixels,
            video_max_pixels: the shard reader's frame sampling and pixel budgets.
        cache_encoded: keep every encoded train sample in memory after its first epoch, so that later epochs
            skip decoding and the processor (the same tensors: a run gives the same batches with or without
            it). For small data read for several epochs on few cores (the demo's grounding step reads its
            6,000 pairs 2.7 times; encoding was ~40% of its step); memory is about the pixel values (4 bytes x
            1176 per patch: ~0.5 MB per demo pair), held in 64 MB slabs that go back to the system when the fit
            ends (urt/data/cache.py). With workers, they encode the first epoch (overlapping the training
            step) and send the units to the main process, which reads the later epochs itself.
        bundle: a ModelBundle to attach right away (else call ``attach(bundle)`` before ``setup``).
    """

    def __init__(self, train_shards=None, val_shards=None, test_shards=None, *, batch_size: int = 8,
                 max_tokens_per_batch: int | None = None, collate: str = "padded", padding_side: str = "right",
                 num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False,
                 shuffle: bool = True, shuffle_buffer: int = 1000, seed: int = 0, order: str = "random",
                 val_order: str = "both", tasks: Sequence[str] | None = None, mode: str = "sft",
                 target: str = "cot", template_set: str | None = None, max_length: int | None = None,
                 on_error: str = "skip", drop_last: bool = False, group_by_length: int = 0, frames: int = 8,
                 frame_sampling: str = "uniform", fps: float | None = None, max_frames: int | None = None,
                 min_pixels: int | None = None, max_pixels: int | None = None,
                 video_min_pixels: int | None = None, video_max_pixels: int | None = None,
                 cache_encoded: bool = False, bundle=None):
        super().__init__()
        self.save_hyperparameters(ignore=["bundle"], logger=False)
        self.train_shards = _as_list(train_shards)
        self.val_shards = _as_list(val_shards)
        self.test_shards = _as_list(test_shards) if test_shards is not None else self.val_shards
        if collate not in COLLATE_KINDS:
            raise UrtError(f"collate must be one of {COLLATE_KINDS}, got {collate!r}")
        for name, o in (("order", order), ("val_order", val_order)):
            if o not in ORDERS:
                raise UrtError(f"{name} must be one of {ORDERS}, got {o!r}")
        if on_error not in ("raise", "skip"):
            raise UrtError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if int(batch_size) < 1:
            raise UrtError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(group_by_length, bool) or int(group_by_length) < 0:
            raise UrtError(f"group_by_length must be an integer >= 0 (batches per length-sorted window; 0 = off), "
                           f"got {group_by_length!r}")
        if collate == "packed" and int(group_by_length) > 1:
            raise UrtError(f"group_by_length={group_by_length} applies to padded batches; packed rows carry no "
                           f"padding (use collate=padded, or group_by_length=0)")
        if collate == "packed" and max_tokens_per_batch is not None and int(max_tokens_per_batch) < 1:
            raise UrtError(f"max_tokens_per_batch must be a positive integer or null, got {max_tokens_per_batch}")
        self.tasks = list(tasks) if tasks else None
        bad = [t for t in self.tasks or [] if t not in TASKS]
        if bad:
            raise UrtError(f"unknown task(s) {bad} in tasks; known tasks: {', '.join(TASKS)}")
        self.batch_size = int(batch_size)
        self.max_tokens_per_batch = int(max_tokens_per_batch) if max_tokens_per_batch else None
        self.collate, self.padding_side = collate, padding_side
        self.num_workers, self.prefetch_factor, self.pin_memory = int(num_workers), int(prefetch_factor), pin_memory
        self.shuffle, self.shuffle_buffer, self.seed = bool(shuffle), int(shuffle_buffer), int(seed)
        self.order, self.val_order = order, val_order
        self.mode, self.target, self.template_set, self.max_length = mode, target, template_set, max_length
        self.on_error, self.drop_last = on_error, bool(drop_last)
        self.group_by_length = int(group_by_length)
        self.cache_encoded = bool(cache_encoded)
        self._encoded = EncodedCache()  # cache_encoded: see ShardStream.cache
        self.load_opts = loading_options(frames=frames, frame_sampling=frame_sampling, fps=fps, max_frames=max_frames,
                                    min_pixels=min_pixels, max_pixels=max_pixels,
                                    video_min_pixels=video_min_pixels, video_max_pixels=video_max_pixels)
        self.bundle = None
        self.encoder: SampleEncoder | None = None
        self.collator = None
        # train position and counts (state_dict)
        self._epoch = 0
        self._complete = False
        self._consumed = 0  # batches this epoch
        self._samples = 0  # encoded samples (units) in those batches
        self._cursors: dict[int, list[int]] = {}
        self._last_worker = -1
        self._stats = SkipStats()
        self._done = SkipStats()  # the counts of the run's finished epochs (state_dict: exact across resumes)
        self._excluded = 0
        self._eval_stats: dict[str, SkipStats] = {}
        self._loaded_position: dict | None = None
        self.history: list[dict] = []  # one entry per finished epoch/evaluation pass
        if bundle is not None:
            self.attach(bundle)

    # ------------------------------------------------------------------------------------ wiring
    def attach(self, bundle) -> "RewardDataModule":
        """Give the data module the model bundle (processor, family, model config for the packed
        collator's mRoPE positions). Call before ``setup`` / ``trainer.fit``."""
        from urt.data.collate import make_collator

        self.bundle = bundle
        if self.collate == "auto":
            from urt.data.collate import packing_pays

            self.collate = "packed" if packing_pays(bundle) else "padded"
            if self.collate == "packed" and self.group_by_length > 1:
                warnings.warn(f"collate=auto chose packed batches (no padding to save): group_by_length="
                              f"{self.group_by_length} is not used", stacklevel=2)
        self.collator = make_collator(self.collate, bundle, padding_side=self.padding_side)
        self.encoder = SampleEncoder(bundle.processor, bundle.family, template_set=self.template_set, mode=self.mode,
                                     target=self.target, max_length=self.max_length)
        self._encoded.clear()  # encoded by the previous bundle's processor
        if self.mode == "sft" and self.target == "cot" and self.order != "keep":
            warnings.warn(f"order={self.order!r} with target='cot': a swapped pair has no CoT (the trace names "
                          f"positions), so swapped samples are counted as 'encode_error' and skipped; use "
                          f"CoTs written for both orders as separate samples, or order='keep'", stacklevel=2)
        return self

    def setup(self, stage: str | None = None) -> None:
        if self.encoder is None:
            raise UrtError("RewardDataModule needs the model bundle: call datamodule.attach(bundle) (or pass "
                           "bundle=...) before setup/fit")

    def teardown(self, stage: str | None = None) -> None:
        if stage == "fit":
            self._encoded.clear()  # cache_encoded serves the epochs of one fit, not whatever runs next

    def _dataset(self, split: str) -> ShardStream:
        self.setup()
        spec = {"train": self.train_shards, "val": self.val_shards, "test": self.test_shards}[split]
        train = split == "train"
        urls = resolve_shards(spec)
        return ShardStream(urls, split=split, encoder=self.encoder, collator=self.collator,
                           batch_size=self.batch_size, collate=self.collate,
                           max_tokens_per_batch=self.max_tokens_per_batch, shuffle=train and self.shuffle,
                           shuffle_buffer=self.shuffle_buffer if train else 0, seed=self.seed,
                           order=self.order if train else self.val_order, tasks=self.tasks, on_error=self.on_error,
                           drop_last=train and self.drop_last, load_opts=self.load_opts,
                           group_by_length=self.group_by_length if train else 0,
                           cache=None)  # set per epoch by StreamLoader (cache_encoded)

    def train_dataloader(self) -> StreamLoader:
        if not self.train_shards:
            raise UrtError("no train_shards configured (data.train_shards)")
        ds = self._dataset("train")
        if not ds.urls:  # an index.json listing no shard: nothing to train on
            raise UrtError(f"data.train_shards={', '.join(self.train_shards)}: no shard to train on (the "
                           f"index.json lists 0 shards)")
        return StreamLoader(self, "train", ds)

    def val_dataloader(self):
        return StreamLoader(self, "val", self._dataset("val")) if self.val_shards else []

    def test_dataloader(self):
        return StreamLoader(self, "test", self._dataset("test")) if self.test_shards else []

    def _every_rank(self, flag: bool) -> bool:
        """`flag` and'ed over the trainer's ranks (a collective: every rank calls it at the same point)."""
        return bool(self.trainer.strategy.reduce_boolean_decision(bool(flag), all=True))

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    # ------------------------------------------------------------------------------------ position
    def _reset_position(self, epoch: int) -> None:
        self._epoch, self._complete = int(epoch), False
        self._consumed = self._samples = self._excluded = 0
        self._cursors, self._last_worker = {}, -1
        self._stats = SkipStats()

    def _begin_train_epoch(self) -> None:
        # The data epoch is the module's own: it advances when a pass over the shards is exhausted, not
        # with trainer.current_epoch (a run stopped by max_steps and continued, or limit_train_batches,
        # continue the same pass instead of skipping the rest of it).
        if self._complete:
            self._done.merge(self._stats)
            self._reset_position(self._epoch + 1)

    def _resume_starts(self) -> tuple[dict[int, tuple[int, int]], int]:
        n = max(1, self.num_workers)
        if self._consumed == 0 and not self._cursors:
            return {}, 0
        starts = {int(w): tuple(int(x) for x in c) for w, c in self._cursors.items()}
        offset = (self._last_worker + 1) % n
        return starts, offset

    def _commit(self, meta: dict) -> None:
        """Account one batch (or a worker's final stats message) as consumed."""
        split = meta["split"]
        counts = _stats_from_dict(meta["counts"])
        if split != "train":
            self._eval_stats.setdefault(split, SkipStats()).merge(counts)
            return
        if int(meta["epoch"]) != self._epoch:
            return  # a straggler from an epoch already left behind
        self._stats.merge(counts)
        self._excluded += int(meta.get("excluded", 0))
        if meta.get("final"):
            return
        w = int(meta["worker"])
        cur = list(meta["cursor"])
        if tuple(cur) > tuple(self._cursors.get(w, (0, 0))):
            self._cursors[w] = cur
        self._consumed += 1
        self._samples += int(meta["n"])
        self._last_worker = w

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Under a Trainer: a training batch counts as consumed when its step receives it."""
        if isinstance(batch, dict) and "_stream" in batch:
            meta = batch.pop("_stream")
            if meta["split"] == "train":
                self._commit(meta)
        return batch

    def _end_epoch(self, split: str, seen: SkipStats) -> None:
        if split == "train":
            self._complete = True
            epoch = self._epoch
        else:
            epoch = int(self.trainer.current_epoch) if self.trainer is not None else 0
        self.history.append({"split": split, "epoch": epoch, **seen.as_dict()})
        self._report(split, epoch, seen)

    def _report(self, split: str, epoch: int, stats: SkipStats) -> None:
        msg = f"data {split} epoch {epoch}: {stats.summary()}"
        if stats.total_skipped:
            warnings.warn(msg, stacklevel=3)
        else:
            log.info(msg)
        trainer = self.trainer
        logger = getattr(trainer, "logger", None) if trainer is not None else None
        if logger is not None:
            metrics = {f"data/{split}/ok": float(stats.ok), f"data/{split}/skipped": float(stats.total_skipped)}
            metrics.update({f"data/{split}/skipped/{r}": float(n) for r, n in stats.skipped.items()})
            logger.log_metrics(metrics, step=int(trainer.global_step))

    # ------------------------------------------------------------------------------------ reporting
    @property
    def skip_stats(self) -> SkipStats:
        """Counts of the current (or just finished) train epoch: ok samples and skips per reason."""
        return self._stats

    @property
    def run_skip_stats(self) -> SkipStats:
        """Counts of the whole run so far: every finished train epoch plus the current one (a run stopped by
        max_steps mid-epoch still reports what the earlier passes skipped)."""
        return SkipStats().merge(self._done).merge(self._stats)

    @property
    def eval_skip_stats(self) -> dict[str, SkipStats]:
        return dict(self._eval_stats)

    @property
    def position(self) -> dict:
        return {"epoch": self._epoch, "complete": self._complete, "batches": self._consumed,
                "samples": self._samples, "excluded_by_task": self._excluded}

    def summary(self) -> str:
        lines = []
        if self._epoch > 0:
            lines.append(f"train, all {self._epoch + 1} epochs: {self.run_skip_stats.summary()}")
        lines += [f"train epoch {self._epoch} ({self._consumed} batches, {self._samples} samples"
                 f"{', complete' if self._complete else ''}): {self._stats.summary()}"]
        if self._excluded:
            lines.append(f"  excluded by the tasks filter: {self._excluded}")
        for split, st in self._eval_stats.items():
            lines.append(f"{split}: {st.summary()}")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------ state
    def _own_position(self) -> dict:
        return {"epoch": self._epoch, "complete": self._complete, "batches": self._consumed,
                "samples": self._samples, "cursors": {str(w): c for w, c in self._cursors.items()},
                "last_worker": self._last_worker, "stats": self._stats.as_dict(), "excluded": self._excluded,
                "done": self._done.as_dict()}

    def state_dict(self) -> dict:
        rank, world = self._rank_world()
        own = self._own_position()
        ranks = {str(rank): own}
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, (rank, own))
            ranks = {str(r): p for r, p in gathered}
        return {"version": STATE_VERSION, "seed": self.seed, "num_workers": self.num_workers, "world_size": world,
                "epoch": self._epoch, "batches": self._consumed, "samples": self._samples, "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state.get("version") != STATE_VERSION:
            raise UrtError(f"data module state version {state.get('version')!r} is not {STATE_VERSION}")
        rank, world = self._rank_world()
        for name, mine in (("seed", self.seed), ("num_workers", self.num_workers), ("world_size", world)):
            if int(state[name]) != int(mine):
                raise UrtError(f"cannot resume the data position: the checkpoint was written with data {name}="
                               f"{state[name]}, this run has {mine}; the sample stream depends on it "
                               f"(resume with the same value)")
        pos = state["ranks"].get(str(rank))
        if pos is None:
            raise UrtError(f"the data module state has no position for rank {rank}")
        self._epoch, self._complete = int(pos["epoch"]), bool(pos["complete"])
        self._consumed, self._samples = int(pos["batches"]), int(pos["samples"])
        self._cursors = {int(w): list(c) for w, c in pos["cursors"].items()}
        self._last_worker = int(pos["last_worker"])
        self._stats = _stats_from_dict(pos["stats"])
        self._done = _stats_from_dict(pos.get("done"))  # absent from checkpoints written before it was kept
        self._excluded = int(pos.get("excluded", 0))


def _as_list(spec) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, (str, bytes)) or not hasattr(spec, "__iter__"):
        return [str(spec)]
    return [str(s) for s in spec]
