"""cache_encoded's store (urt/data/cache.py): exact copies, kept in slabs that go back to the system when cleared;
units sent from a DataLoader worker arrive exactly."""

import torch

from urt.data.cache import SLAB_BYTES, EncodedCache, UnitCollector, unpack_into
from urt.data.encode import Encoded


def _enc(i: int, patches: int = 64) -> Encoded:
    g = torch.Generator().manual_seed(i)
    n = 30 + i % 7
    return Encoded(key=f"k{i}", task="image_generation", label=1, input_ids=torch.randint(0, 1000, (n,), generator=g),
                   labels=torch.full((n,), -100), mm_token_type_ids=torch.zeros(n, dtype=torch.long),
                   visual={"pixel_values": torch.randn(patches, 1176, generator=g),
                           "image_grid_thw": torch.tensor([[1, 8, 8]]),
                           "mask": torch.rand(n, generator=g) > 0.5},
                   prompt_length=n - 3, meta={"i": i})


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_kept_units_equal_the_encoded_ones_and_live_in_the_slabs():
    cache = EncodedCache(slab_bytes=1 << 20)
    originals = [_enc(i) for i in range(8)]
    for i, e in enumerate(originals):
        kept = cache.put(("shard-0.tar", f"r{i}"), e.key, bool(i % 2), e)
        assert kept is not e and kept.meta == e.meta and kept.prompt_length == e.prompt_length
    assert len(cache) == 8 and cache.units == 8 and ("shard-0.tar", "r3") in cache
    slabs = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in cache._slabs]
    for i, e in enumerate(originals):
        entry = cache.get(("shard-0.tar", f"r{i}"))
        assert entry["key"] == e.key
        kept = entry[bool(i % 2)]
        for a, b in [(kept.input_ids, e.input_ids), (kept.labels, e.labels),
                     (kept.mm_token_type_ids, e.mm_token_type_ids), *[(kept.visual[k], e.visual[k]) for k in e.visual]]:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            assert a.data_ptr() % 64 == 0 and any(lo <= a.data_ptr() < hi for lo, hi in slabs)
    # 8 x 0.3 MB of pixel patches (+ a little) in 1 MB slabs: three per slab
    assert len(cache._slabs) == 3 and cache.nbytes == 3 << 20


def test_a_tensor_larger_than_a_slab_is_kept_on_its_own():
    cache = EncodedCache(slab_bytes=1 << 16)
    e = _enc(0)
    kept = cache.put(("s", "r"), e.key, False, e)
    assert torch.equal(kept.visual["pixel_values"], e.visual["pixel_values"])
    assert kept.visual["pixel_values"].data_ptr() != e.visual["pixel_values"].data_ptr()
    assert cache.nbytes == len(cache._slabs) * (1 << 16) + e.visual["pixel_values"].nbytes


def test_slabs_are_mapped_alone_and_clear_gives_their_memory_back():
    """The point of the slabs: each is larger than glibc's 32 MB mmap ceiling, so the allocator maps it on its own
    and a cleared cache leaves no grown heap behind (RSS falls by what it held)."""
    assert SLAB_BYTES > 32 << 20
    cache = EncodedCache()
    for i in range(600):  # 600 x 0.3 MB: ~180 MB in three 64 MB slabs
        cache.put(("s", i), f"k{i}", False, _enc(i))
    held = cache.nbytes
    assert held == 3 * SLAB_BYTES
    before = _rss()
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    assert before - _rss() > 0.9 * held


def test_units_from_a_worker_arrive_exactly():
    """A worker's UnitCollector misses every lookup and packs the units put since its last batch into one
    byte buffer; unpacked into the main process's cache they equal the encoded ones (every dtype, odd sizes,
    a unit without mm_token_type_ids), and the next pack starts empty."""
    worker = UnitCollector()
    units = [_enc(i, patches=3 + i) for i in range(5)]
    units[2].mm_token_type_ids = None
    for i, e in enumerate(units):
        assert worker.get(("s.tar", f"r{i}")) is None
        worker.put(("s.tar", f"r{i}"), e.key, bool(i % 2), e)
    packed = worker.pack()
    assert packed["bytes"].dtype == torch.uint8 and worker.pack() is None
    cache = EncodedCache(slab_bytes=1 << 20)
    assert unpack_into(cache, packed) == 5
    for i, e in enumerate(units):
        entry = cache.get(("s.tar", f"r{i}"))
        kept = entry[bool(i % 2)]
        assert entry["key"] == e.key and kept.meta == e.meta and kept.prompt_length == e.prompt_length
        assert (kept.mm_token_type_ids is None) == (e.mm_token_type_ids is None)
        pairs = [(kept.input_ids, e.input_ids), (kept.labels, e.labels), *[(kept.visual[k], e.visual[k]) for k in e.visual]]
        if e.mm_token_type_ids is not None:
            pairs.append((kept.mm_token_type_ids, e.mm_token_type_ids))
        assert kept.visual.keys() == e.visual.keys()
        for a, b in pairs:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
