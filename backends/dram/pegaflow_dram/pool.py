"""Slab allocator over one pre-allocated region: offsets only, no memory of its own.

The pool is cut into equal chunks. A chunk is bound on demand to one *size class* (a slot size)
and cut into slots of that size; a chunk whose slots are all free again goes back to the pool, so
a workload that switches block sizes does not strand memory in the old class. Everything is O(1)
per slot: each chunk keeps a stack of freed slots plus a bump pointer for never-used ones (so
binding a 64 MiB chunk to 64-byte slots costs nothing up front), and each class keeps an ordered
set (a dict) of chunks that still have room.

The allocator is not thread-safe by itself; its owner (the tier) calls it under its metadata lock.
"""

from __future__ import annotations

from dataclasses import dataclass

from pegaflow_core import CapacityError, InvalidArgument
from pegaflow_core.sizes import format_size

PAGE = 4096
SMALL_ALIGN = 64  # below one page, slots are cache-line aligned so copies never share a line


def slot_size(nbytes: int) -> int:
    """The size class of a block: rounded up to 4096 bytes, or to 64 bytes below 4096.

    Page-sized slots keep large blocks page-aligned (DMA, O_DIRECT and RDMA registrations want
    that); small blocks would waste most of a page, so they only get cache-line alignment.
    """
    align = PAGE if nbytes >= PAGE else SMALL_ALIGN
    return -(-nbytes // align) * align


class _Chunk:
    """Bookkeeping of one chunk while it is bound to a size class."""

    __slots__ = ("index", "slot", "slots", "fresh", "freed", "used")

    def __init__(self, index: int, slot: int, slots: int) -> None:
        self.index = index
        self.slot = slot  # slot size in bytes
        self.slots = slots  # how many slots fit in the chunk
        self.fresh = 0  # slots [fresh, slots) were never handed out since binding
        self.freed: list[int] = []  # slot numbers handed back, reused first (LIFO: warm in cache)
        self.used = 0


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of the allocator, for metrics and for tests of fragmentation."""

    chunk_bytes: int
    chunks: int
    free_chunks: int
    slots_used: dict[int, int]  # slot size -> slots in use
    chunks_bound: dict[int, int]  # slot size -> chunks bound to that class

    @property
    def used_slot_bytes(self) -> int:
        return sum(size * n for size, n in self.slots_used.items())


class SlabAllocator:
    """Hands out ``(offset, slot_size)`` slots from ``chunks`` chunks of ``chunk_bytes`` each.

    Offsets are relative to the start of the pool's data region; the owner adds its base.
    """

    def __init__(self, chunk_bytes: int, chunks: int, ready: bool = True) -> None:
        if chunk_bytes <= 0 or chunk_bytes % PAGE:
            raise InvalidArgument(f"chunk: expected a positive multiple of {PAGE} bytes, got {chunk_bytes}")
        if chunks <= 0:
            raise InvalidArgument(f"pool: expected at least one chunk, got {chunks}")
        self.chunk_bytes = chunk_bytes
        self.chunks = chunks
        # Free chunks as a stack; the lowest indices come out first, so a lightly used pool stays
        # compact at the front (fewer pages touched when populate is off). With ``ready=False``
        # chunks start "cold" (pages not faulted in yet) and move to the free stack as
        # ``mark_ready`` says; cold chunks are handed out only when no warm one is left.
        self._ready: set[int] | None = None if ready else set()
        self._free_chunks = list(range(chunks - 1, -1, -1)) if ready else []
        self._cold_chunks = [] if ready else list(range(chunks - 1, -1, -1))
        self._bound: dict[int, _Chunk] = {}  # chunk index -> state, for chunks bound to a class
        self._partial: dict[int, dict[int, _Chunk]] = {}  # slot size -> chunks with a free slot

    def check_fits(self, nbytes: int) -> int:
        """The slot size for ``nbytes``; CapacityError naming both sizes if no chunk can hold it."""
        if nbytes > self.chunk_bytes:
            raise CapacityError(
                f"block of {nbytes} bytes ({format_size(nbytes)}) is larger than the pool's chunk of "
                f"{self.chunk_bytes} bytes ({format_size(self.chunk_bytes)}); raise the dram tier's 'chunk' option"
            )
        if nbytes <= 0:
            raise InvalidArgument(f"block size: expected at least 1 byte, got {nbytes}")
        return slot_size(nbytes)

    def alloc(self, nbytes: int, count: int = 1) -> list[int]:
        """Up to ``count`` slot offsets for blocks of ``nbytes``; fewer (maybe none) when full."""
        size = self.check_fits(nbytes)
        partial = self._partial.setdefault(size, {})
        out: list[int] = []
        while len(out) < count:
            if partial:
                chunk = partial[next(reversed(partial))]  # most recently opened: fill it before others
            elif self._free_chunks or self._cold_chunks:
                index = (self._free_chunks or self._cold_chunks).pop()
                chunk = _Chunk(index, size, self.chunk_bytes // size)
                self._bound[index] = chunk
                partial[index] = chunk
            else:
                break
            base = chunk.index * self.chunk_bytes
            take = min(count - len(out), chunk.slots - chunk.used)
            reused = min(take, len(chunk.freed))  # freed slots first, most recently freed first
            slots = chunk.freed[len(chunk.freed) - reused :][::-1]
            del chunk.freed[len(chunk.freed) - reused :]
            slots.extend(range(chunk.fresh, chunk.fresh + take - reused))
            chunk.fresh += take - reused
            chunk.used += take
            out.extend(base + slot * size for slot in slots)
            if chunk.used == chunk.slots:
                del partial[chunk.index]
        return out

    def mark_ready(self, index: int) -> None:
        """Chunk ``index``'s pages are in memory: prefer it to cold chunks from now on."""
        if self._ready is None or index in self._ready:
            return
        self._ready.add(index)
        if index in self._cold_chunks:
            self._cold_chunks.remove(index)
            self._free_chunks.append(index)

    def claim(self, offset: int, nbytes: int) -> bool:
        """Mark the slot at ``offset`` used for a block of ``nbytes``, as a re-attached pool's
        journal says it is. False (and nothing changed) when the slot cannot be that: its chunk
        is bound to another size class, the offset is not on a slot boundary, or it is taken."""
        size = self.check_fits(nbytes)
        index, within = divmod(offset, self.chunk_bytes)
        if offset < 0 or index >= self.chunks or within % size or within + size > self.chunk_bytes:
            return False
        chunk = self._bound.get(index)
        if chunk is None:
            for stack in (self._free_chunks, self._cold_chunks):
                if index in stack:
                    stack.remove(index)
            chunk = _Chunk(index, size, self.chunk_bytes // size)
            self._bound[index] = chunk
            self._partial.setdefault(size, {})[index] = chunk
        elif chunk.slot != size:
            return False
        slot = within // size
        if slot >= chunk.fresh:
            chunk.freed.extend(range(chunk.fresh, slot))
            chunk.fresh = slot + 1
        elif slot in chunk.freed:
            chunk.freed.remove(slot)
        else:
            return False
        chunk.used += 1
        if chunk.used == chunk.slots:
            self._partial[size].pop(index, None)
        return True

    def free(self, offset: int) -> None:
        """Give a slot back. A chunk left with no used slot returns to the pool at once."""
        index, within = divmod(offset, self.chunk_bytes)
        chunk = self._bound.get(index)
        if chunk is None or within % chunk.slot or within // chunk.slot >= chunk.fresh:
            raise InvalidArgument(f"offset {offset} is not an allocated slot of this pool")
        slot = within // chunk.slot
        partial = self._partial[chunk.slot]
        if chunk.used == chunk.slots:
            partial[index] = chunk
        chunk.used -= 1
        if chunk.used == 0:
            del partial[index]
            del self._bound[index]
            if self._ready is None or index in self._ready:
                self._free_chunks.append(index)
            else:
                self._cold_chunks.append(index)
        else:
            chunk.freed.append(slot)

    def stats(self) -> PoolStats:
        used: dict[int, int] = {}
        bound: dict[int, int] = {}
        for chunk in self._bound.values():
            used[chunk.slot] = used.get(chunk.slot, 0) + chunk.used
            bound[chunk.slot] = bound.get(chunk.slot, 0) + 1
        return PoolStats(self.chunk_bytes, self.chunks, len(self._free_chunks) + len(self._cold_chunks), used, bound)
