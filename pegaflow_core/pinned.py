"""Which host memory of this process is page-locked for the GPU.

Asynchronous DMA between the GPU and host memory needs the host side page-locked; the DRAM tier
pins its pool chunk by chunk in the background (so a large pool serves within seconds of start),
so "is this block pinned yet" is a per-copy question: tiers record ranges here as they pin them,
and GPU memory kinds ask before queueing DMA, copying the rest with synchronous driver copies.
"""

from __future__ import annotations

import bisect
import threading

import numpy as np

_lock = threading.Lock()
_starts: list[int] = []
_ends: list[int] = []
_arrays: tuple[np.ndarray, np.ndarray] | None = None  # numpy copies of the lists, rebuilt on change


def add(address: int, length: int) -> None:
    """Record ``[address, address + length)`` as pinned (after cudaHostRegister succeeded)."""
    global _arrays
    with _lock:
        i = bisect.bisect_left(_starts, address)
        _starts.insert(i, address)
        _ends.insert(i, address + length)
        _arrays = None


def remove(address: int) -> None:
    """Forget the range starting at ``address`` (before cudaHostUnregister)."""
    global _arrays
    with _lock:
        i = bisect.bisect_left(_starts, address)
        if i < len(_starts) and _starts[i] == address:
            del _starts[i], _ends[i]
            _arrays = None


def covered(addresses: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """For each ``[addresses[i], addresses[i] + lengths[i])``: whether it lies inside one pinned
    range. Vectorized: tens of thousands of segments per step cost microseconds."""
    i, ends = _containing(addresses)
    return (i >= 0) & (np.asarray(addresses, dtype=np.uint64) + np.asarray(lengths, dtype=np.uint64) <= ends)


def range_index(addresses: np.ndarray) -> np.ndarray:
    """For each address: which pinned range holds it (-1: none). One DMA copy must not cross from
    one range into the next even where they touch, as chunks pinned one by one do: each is its own
    registration, and the driver refuses a copy spanning two."""
    return _containing(addresses)[0]


def _containing(addresses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The index of the last pinned range starting at or below each address (-1 where it does not
    hold the address) and that range's end."""
    global _arrays
    addresses = np.asarray(addresses, dtype=np.uint64)
    with _lock:
        if not _starts:
            return np.full(addresses.shape, -1, dtype=np.int64), np.zeros(addresses.shape, dtype=np.uint64)
        if _arrays is None:
            _arrays = (np.array(_starts, dtype=np.uint64), np.array(_ends, dtype=np.uint64))
        starts, ends = _arrays
    i = np.searchsorted(starts, addresses, side="right") - 1
    end = ends[np.maximum(i, 0)]
    return np.where((i >= 0) & (addresses < end), i, -1), end
