"""Unit tests of the slab allocator: size classes, chunk reuse, fragmentation, too-large blocks."""

from __future__ import annotations

import pytest

from pegaflow_core import CapacityError, InvalidArgument
from pegaflow_dram.pool import SlabAllocator, slot_size

CHUNK = 64 * 1024


@pytest.mark.parametrize(
    ("nbytes", "expected"),
    [(1, 64), (64, 64), (65, 128), (4095, 4096), (4096, 4096), (4097, 8192), (2 << 20, 2 << 20)],
)
def test_size_classes(nbytes: int, expected: int) -> None:
    assert slot_size(nbytes) == expected


def test_slots_are_distinct_aligned_and_inside_the_pool() -> None:
    alloc = SlabAllocator(CHUNK, 4)
    offsets = alloc.alloc(5000, 40)  # 8 KiB slots: 8 per chunk, 32 in all
    assert len(offsets) == 32
    assert len(set(offsets)) == 32
    assert all(off % 4096 == 0 and off + 8192 <= 4 * CHUNK for off in offsets)
    assert alloc.alloc(5000) == []


def test_freed_slot_is_reused_and_empty_chunk_returns_to_the_pool() -> None:
    alloc = SlabAllocator(CHUNK, 2)
    a, b = alloc.alloc(4096, 2)
    assert alloc.stats().free_chunks == 1
    alloc.free(a)
    assert alloc.alloc(4096) == [a]
    alloc.free(a)
    alloc.free(b)
    stats = alloc.stats()
    assert stats.free_chunks == 2 and stats.slots_used == {} and stats.chunks_bound == {}


def test_two_block_sizes_share_the_pool_through_chunk_reuse() -> None:
    alloc = SlabAllocator(CHUNK, 4)
    small = alloc.alloc(1000, 10_000)  # 1024-byte class takes every chunk
    assert len(small) == 4 * CHUNK // 1024
    assert alloc.alloc(16384) == []  # no chunk left for the other class
    for off in small[: CHUNK // 1024]:  # empty exactly one chunk (slots are handed out chunk by chunk)
        alloc.free(off)
    big = alloc.alloc(16384, 10)
    assert len(big) == CHUNK // 16384  # the freed chunk now serves the 16 KiB class
    assert alloc.stats().chunks_bound == {1024: 3, 16384: 1}


def test_scattered_frees_keep_chunks_bound_until_fully_empty() -> None:
    alloc = SlabAllocator(CHUNK, 2)
    offsets = alloc.alloc(4096, 32)
    for off in offsets[::2]:  # half of every chunk freed: fragmentation, no chunk is empty
        alloc.free(off)
    assert alloc.stats().free_chunks == 0
    assert alloc.alloc(8192) == []  # other classes cannot use half-empty chunks
    assert len(alloc.alloc(4096, 100)) == 16  # but the same class refills the holes


def test_block_larger_than_a_chunk_names_both_sizes() -> None:
    alloc = SlabAllocator(CHUNK, 2)
    with pytest.raises(CapacityError, match=rf"block of {CHUNK + 1} bytes .* chunk of {CHUNK} bytes"):
        alloc.alloc(CHUNK + 1)
    assert len(alloc.alloc(CHUNK)) == 1  # exactly one chunk fits


def test_bad_geometry_and_bad_free_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="multiple of 4096"):
        SlabAllocator(1000, 1)
    alloc = SlabAllocator(CHUNK, 1)
    (off,) = alloc.alloc(4096)
    with pytest.raises(InvalidArgument, match="not an allocated slot"):
        alloc.free(off + 64)
    with pytest.raises(InvalidArgument, match="at least 1 byte"):
        alloc.alloc(0)


def test_random_alloc_free_never_overlaps() -> None:
    import random

    rng = random.Random(7)
    alloc = SlabAllocator(CHUNK, 8)
    live: dict[int, int] = {}
    for _ in range(3000):
        if live and rng.random() < 0.45:
            off = rng.choice(list(live))
            del live[off]
            alloc.free(off)
        else:
            size = rng.choice([100, 3000, 4096, 20000])
            for off in alloc.alloc(size, rng.randint(1, 4)):
                live[off] = slot_size(size)
        spans = sorted(live.items())
        assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))
    assert sum(alloc.stats().slots_used.values()) == len(live)
