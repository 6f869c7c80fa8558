"""`cache_encoded`'s store: every encoded train sample of a fit, kept for its later epochs, in slabs of memory of
its own.

Why slabs: the demo's grounding caches ~5 GB of encodings (pixel patches, 0.3 MB per image) as tens of thousands
of tensors. Allocated one by one they land in glibc's heap (its mmap threshold grows past their size after the
first frees), and once the fit ends and the cache is freed that heap stays, fragmented, at its peak: every later
step of the same process (the pipeline's base, cold start, rejection sampling...) then ran markedly slower
(measured: docs/performance.md §Encoded-sample cache, `benchmarks/cache_heap.py`).
Copied into 64 MB slabs, which the allocator maps and unmaps on their own (any request above glibc's 32 MB
mmap ceiling), the cache never enters the heap, and clearing it gives its memory back to the system.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from urt.data.encode import Encoded

SLAB_BYTES = 64 << 20
_ALIGN = 64  # bytes: any dtype's alignment, and a cache line


class EncodedCache:
    """(shard url, raw key) -> {"key": sample key, swapped?: Encoded} for the epochs of one fit."""

    def __init__(self, slab_bytes: int = SLAB_BYTES):
        self.slab_bytes = int(slab_bytes)
        self._items: dict[tuple[str, Any], dict] = {}
        self._slabs: list[torch.Tensor] = []
        self._used = 0  # bytes used in the last slab
        self._own_bytes = 0  # tensors larger than a slab, each in a buffer of its own (mapped alone as well)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, k) -> bool:
        return k in self._items

    def get(self, k, default=None):
        return self._items.get(k, default)

    @property
    def units(self) -> int:
        """Encoded units kept (a sample kept in both orders counts twice)."""
        return sum(len(v) - 1 for v in self._items.values())

    @property
    def nbytes(self) -> int:
        """Memory held: the slabs (and tensors too large for one, held on their own)."""
        return len(self._slabs) * self.slab_bytes + self._own_bytes

    def put(self, k, key: str, swap: bool, enc: Encoded) -> Encoded:
        """Keep `enc` (the unit of raw sample `k` in order `swap`) with its tensors copied into the slabs;
        returns the kept copy."""
        kept = replace(enc, input_ids=self._copy(enc.input_ids), labels=self._copy(enc.labels),
                       visual={name: self._copy(t) for name, t in enc.visual.items()},
                       mm_token_type_ids=None if enc.mm_token_type_ids is None else self._copy(enc.mm_token_type_ids))
        self._items.setdefault(k, {"key": key})[swap] = kept
        return kept

    def clear(self) -> None:
        self._items.clear()
        self._slabs.clear()
        self._used = 0
        self._own_bytes = 0

    def _copy(self, t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach()
        n = t.numel() * t.element_size()
        if n == 0:
            return t.clone()
        if n > self.slab_bytes:
            self._own_bytes += n
            return t.clone(memory_format=torch.contiguous_format)
        off = -(-self._used // _ALIGN) * _ALIGN
        if not self._slabs or off + n > self.slab_bytes:
            self._slabs.append(torch.empty(self.slab_bytes, dtype=torch.uint8))
            off = 0
        out = self._slabs[-1][off:off + n].view(t.dtype).view(t.shape)
        out.copy_(t)
        self._used = off + n
        return out


# ------------------------------------------------------------------------------- filled from workers
# With DataLoader workers, the first epoch is encoded in a worker (overlapping the training step instead of
# preceding it) and the encoded units travel to the main process's cache with their batch; the later epochs read
# the cache in the main process (urt.data.datamodule.StreamLoader). A batch's units travel as one flat byte
# buffer: one shared-memory transfer per batch instead of one per tensor (~130 for a demo batch). Where the worker
# has no core of its own it is slower than encoding in the main process
# (2 cores: docs/performance.md §Encoded-sample cache).

_FIELDS = ("input_ids", "labels", "mm_token_type_ids")


class UnitCollector:
    """A worker's stand-in for the cache: nothing is cached there (`get` misses); `put` keeps the unit until
    `pack` sends it with the next batch."""

    def __init__(self):
        self._units: list[tuple] = []

    def get(self, k, default=None):
        return default

    def put(self, k, key: str, swap: bool, enc: Encoded) -> Encoded:
        self._units.append((k, key, swap, enc))
        return enc

    def pack(self) -> dict | None:
        """The units put since the last call, as {"bytes": one uint8 tensor, "units": [(k, key, swap, Encoded
        without its tensors, {field: (offset, dtype, shape)})]}; None when there are none."""
        if not self._units:
            return None
        parts, units, off = [], [], 0
        for k, key, swap, enc in self._units:
            specs = {}
            named = [(f, getattr(enc, f)) for f in _FIELDS] + [(f"visual.{n}", t) for n, t in enc.visual.items()]
            for name, t in named:
                if t is None:
                    continue
                flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
                pad = -off % _ALIGN  # each tensor aligned, so that its bytes can be viewed as its dtype
                if pad:
                    parts.append(torch.zeros(pad, dtype=torch.uint8))
                    off += pad
                specs[name] = (off, t.dtype, tuple(t.shape))
                parts.append(flat)
                off += flat.numel()
            bare = replace(enc, input_ids=None, labels=None, visual={}, mm_token_type_ids=None)
            units.append((k, key, swap, bare, specs))
        self._units = []
        return {"bytes": torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8), "units": units}


def unpack_into(cache: EncodedCache, packed: dict) -> int:
    """Put the units of a `UnitCollector.pack` into `cache` (copied into its slabs); returns how many."""
    buf = packed["bytes"]

    def view(spec):
        off, dtype, shape = spec
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        return buf[off:off + n].view(dtype).view(shape)

    for k, key, swap, bare, specs in packed["units"]:
        fields = {f: view(specs[f]) if f in specs else None for f in _FIELDS}
        visual = {name[len("visual."):]: view(s) for name, s in specs.items() if name.startswith("visual.")}
        cache.put(k, key, swap, replace(bare, visual=visual, **fields))
    return len(packed["units"])
