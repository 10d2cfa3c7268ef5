"""Host-memory block copies between an engine's KV regions and tier memory.

A block is one contiguous piece per plane (see layout.py), so a save of N blocks is N x planes
copies (625 blocks x 64 planes for a 10K-token Llama-8B prompt). The copier turns a batch into
three address arrays (destination, source, length) with vectorized numpy arithmetic, then hands
slices of them, on a few threads, to a small C routine (built at install time, called through
ctypes with the GIL released) when the engine memory is mapped here, or to process_vm_readv /
writev when it lives in the engine process (cma.py). Without the compiled routine it falls back to
one ctypes memmove per segment (same bytes, slower). The GPU path implements the same two calls.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import cma
from .buffers import PoolViews, pick
from .contexts import EngineRegion
from .layout import KVLayout

log = logging.getLogger("pegaflow.copier")

_LIBRARY = Path(__file__).parent / "_native" / "libsegcopy.so"


def native_library() -> ctypes.CDLL | None:
    """The compiled routines (copies, checksums), or None where they were not built."""
    if os.environ.get("PEGAFLOW_NATIVE_COPY", "1") == "0" or not _LIBRARY.exists():
        return None
    try:
        return ctypes.CDLL(str(_LIBRARY))
    except OSError as exc:
        log.warning("native routines unavailable (%s); using numpy copies and xxhash", exc)
        return None


def _load_native() -> Callable[..., None] | None:
    lib = native_library()
    if lib is None:
        return None
    fn = lib.pegaflow_copy_segments
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return fn


def buffer_address(buffer: memoryview | np.ndarray) -> int:
    """The first byte's address of a buffer (read-only views too)."""
    array = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, dtype=np.uint8)
    return array.__array_interface__["data"][0]


class _PyBuffer(ctypes.Structure):
    """CPython's Py_buffer (stable ABI since 3.11)."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]


def buffer_addresses(buffers: Sequence[memoryview]) -> np.ndarray:
    """First-byte addresses of many buffers: those a tier gave as ``PoolViews`` know theirs;
    others go through the buffer protocol directly (a numpy view per buffer costs ~5 us, which
    is milliseconds per 625-block request)."""
    if isinstance(buffers, PoolViews):
        return np.asarray(buffers.addresses, dtype=np.uint64)
    out = np.empty(len(buffers), dtype=np.uint64)
    view = _PyBuffer()
    for i, buffer in enumerate(buffers):
        _get_buffer(buffer, view, 0)  # a pythonapi call: a failure raises the TypeError it set
        out[i] = view.buf or 0
        _release_buffer(view)
    return out


def block_segments(
    layout: KVLayout, regions: Sequence[EngineRegion], block_ids: Sequence[int], starts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[blocks, planes]`` arrays: engine address, stored-block address, length (``starts``: each
    stored block's first byte). Every memory kind copies these segments; only how differs."""
    engine, size = engine_addresses(layout, regions, block_ids)
    offset = np.array(layout.plane_offsets(), dtype=np.uint64)
    stored = starts[:, None] + offset[None, :]
    length = np.broadcast_to(size, engine.shape)
    return engine, stored, length


def block_addresses(
    layout: KVLayout, regions: Sequence[EngineRegion], block_ids: Sequence[int], blocks: Sequence[memoryview]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Engine plane addresses ``[blocks, planes]``, stored-block starts ``[blocks]`` and plane
    lengths ``[planes]``: the compact form of block_segments, for copy paths that move whole
    stored blocks (planes lie back to back in one, at ``layout.plane_offsets()``)."""
    engine, size = engine_addresses(layout, regions, block_ids)
    starts = buffer_addresses(blocks)
    return engine, starts, size


def engine_segments(layout: KVLayout, regions: Sequence[EngineRegion], block_ids: Sequence[int]) -> list[list[tuple[int, int]]]:
    """Per engine block, its ``(address, nbytes)`` pieces in stored-block byte order (planes are
    stored one after another): what a tier with device I/O reads a block into
    (``Tier.read_into_device``)."""
    engine, size = engine_addresses(layout, regions, block_ids)
    sizes = [int(n) for n in size]
    return [list(zip(map(int, row), sizes)) for row in engine]


def engine_addresses(layout: KVLayout, regions: Sequence[EngineRegion], block_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Each block's plane addresses ``[blocks, planes]`` in the regions (``base``: where the one
    copying sees each region) and the planes' lengths."""
    planes = layout.planes
    base = np.array([regions[p.region].base + p.offset for p in planes], dtype=np.uint64)
    stride = np.array([p.block_stride for p in planes], dtype=np.uint64)
    size = np.array([p.block_bytes for p in planes], dtype=np.uint64)
    ids = np.asarray(block_ids, dtype=np.uint64)
    return base[None, :] + ids[:, None] * stride[None, :], size


class HostCopier:
    """Gathers engine blocks into stored blocks and scatters them back, on a small thread pool."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="pegaflow-copy") if self.threads > 1 else None
        self._native = _load_native()

    @property
    def native(self) -> bool:
        return self._native is not None

    def gather(self, layout: KVLayout, regions: Sequence[EngineRegion], block_ids: Sequence[int], dests: Sequence[memoryview]) -> None:
        """Copy engine block ``block_ids[i]`` (all planes) into ``dests[i]``."""
        if not block_ids:
            return
        engine, stored, length = block_segments(layout, regions, block_ids, buffer_addresses(dests))
        self._copy(regions[0].pid, stored, engine, length, into_engine=False)

    def scatter(
        self,
        layout: KVLayout,
        regions: Sequence[EngineRegion],
        block_ids: Sequence[int],
        sources: Sequence[memoryview | None],
        on_layer: Callable[[int], None] | None = None,
    ) -> None:
        """Copy ``sources[i]`` into engine block ``block_ids[i]`` layer by layer (``None``
        sources are skipped); ``on_layer(k)`` runs once layers ``[0, k)`` are complete."""
        rows = [i for i, s in enumerate(sources) if s is not None]
        starts = buffer_addresses(pick(sources, rows)) if rows else np.zeros(0, dtype=np.uint64)
        self.scatter_from(layout, regions, [block_ids[i] for i in rows], starts, on_layer)

    def scatter_from(self, layout: KVLayout, regions: Sequence[EngineRegion], block_ids: Sequence[int],
                     starts: np.ndarray, on_layer: Callable[[int], None] | None = None) -> None:
        """``scatter`` of stored blocks given by their first byte's address here (``starts``)."""
        groups = layout.layer_groups()
        if len(block_ids):
            engine, stored, length = block_segments(layout, regions, block_ids, starts)
        for done, group in enumerate(groups, start=1):
            if len(block_ids):
                self._copy(regions[0].pid, engine[:, group], stored[:, group], length[:, group], into_engine=True)
            if on_layer is not None:
                on_layer(done)

    def _copy(self, pid: int, dst: np.ndarray, src: np.ndarray, length: np.ndarray, into_engine: bool) -> None:
        """Copy ``length[i]`` bytes from ``src[i]`` to ``dst[i]``. With ``pid`` the engine side of
        each pair is in that process: ``dst`` when ``into_engine``, else ``src``."""
        dst, src, length = (np.ascontiguousarray(a, dtype=np.uint64).reshape(-1) for a in (dst, src, length))
        n = dst.size
        if pid:
            local, remote = (src, dst) if into_engine else (dst, src)

            def part(lo: int, hi: int) -> None:
                cma.transfer(pid, local[lo:hi], remote[lo:hi], length[lo:hi], write=into_engine)
        else:
            fn = self._native or _memmove_each

            def part(lo: int, hi: int) -> None:
                fn(buffer_address(dst[lo:]), buffer_address(src[lo:]), buffer_address(length[lo:]), hi - lo)

        if self._pool is None or n < 4 * self.threads:
            part(0, n)
            return
        step = -(-n // self.threads)
        futures = [self._pool.submit(part, lo, min(n, lo + step)) for lo in range(0, n, step)]
        for future in futures:
            future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _memmove_each(dst: int, src: int, length: int, n: int) -> None:
    """Fallback with the native routine's signature: one ctypes memmove per segment."""
    dsts = np.ctypeslib.as_array(ctypes.cast(dst, ctypes.POINTER(ctypes.c_uint64)), shape=(n,))
    srcs = np.ctypeslib.as_array(ctypes.cast(src, ctypes.POINTER(ctypes.c_uint64)), shape=(n,))
    lens = np.ctypeslib.as_array(ctypes.cast(length, ctypes.POINTER(ctypes.c_uint64)), shape=(n,))
    for d, s, l in zip(dsts.tolist(), srcs.tolist(), lens.tolist()):
        ctypes.memmove(d, s, l)
