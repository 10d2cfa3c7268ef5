"""A lane: one direction of copies on one GPU (saves D2H, loads H2D), so a save and a load use
PCIe's two directions at once.

Bytes cross PCIe by DMA through a staging buffer in GPU memory, not by SMs reading host memory:
a save gathers engine planes into staging with the copy kernel (device to device, ~500 GB/s on
the H100 machine) and the copy engines write whole stored blocks into the pinned pool with one
cuMemcpyBatchAsync; a load reads pieces of stored blocks into staging the same way and the
kernel scatters them into the engine's blocks. Measured there: batched DMA of 2 MiB pieces runs at
0.98 of a one-piece pinned memcpy, SM-driven zero-copy at 0.92 (docs/benchmarks.md).

Work is cut into tiles that fit one staging buffer; two buffers alternate so the DMA of one tile
overlaps the kernel of the other, on two streams ordered by events. A load goes layer group by
layer group: consecutive layers are merged until each block's piece is at least MIN_PIECE bytes
(DMA of 64 KiB pieces reaches only 0.76 of the ceiling), and the caller hears about a layer as
soon as the last scatter of its group completes, while later groups are still moving.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pegaflow_core import pinned
from pegaflow_core.errors import InvalidArgument
from pegaflow_core.sizes import parse_size

from . import driver
from .driver import BatchCopier, Device, check
from .kernels import THREADS, copy_function

# Per buffer; a lane has two (PEGAFLOW_CUDA_STAGING overrides both, e.g. "64mb"). Loads run while
# the engine computes, and two processes' kernels are time-sliced on the GPU: a scatter kernel may
# wait for the engine's slice, and larger buffers let the DMA run ahead meanwhile (warm 10K TTFT on
# the H100: 45.6 ms with 32 MiB, 37.7 with 128, 39.2 with 512; docs/benchmarks.md).
STAGING_BYTES = {"save": 32 << 20, "load": 128 << 20}
MIN_PIECE = 256 << 10


@dataclass
class Blocks:
    """One request: plane ``p`` of the i-th block is ``length[p]`` bytes at ``engine[i, p]`` on the
    GPU and at ``stored[i] + offset[p]`` in the pinned pool (uint64 arrays)."""

    engine: np.ndarray  # [B, P]
    stored: np.ndarray  # [B]
    offset: np.ndarray  # [P]
    length: np.ndarray  # [P]

    def take(self, rows: np.ndarray) -> Blocks:
        return Blocks(self.engine[rows], self.stored[rows], self.offset, self.length)


@dataclass
class _Runs:
    """Where a set of planes lies in a stored block (``offset``/``length`` of its contiguous runs)
    and in a staging piece (runs packed back to back from ``stage``; plane ``planes[j]`` at
    ``rel[j]``)."""

    planes: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    stage: np.ndarray
    rel: np.ndarray
    piece: int  # bytes of one block's piece in staging: the runs' total

    @classmethod
    def of(cls, planes: np.ndarray, offset: np.ndarray, length: np.ndarray) -> _Runs:
        order = np.argsort(offset[planes], kind="stable")
        starts, sizes = offset[planes][order], length[planes][order]
        ends = starts + sizes
        new = np.ones(len(order), dtype=bool)
        new[1:] = starts[1:] != ends[:-1]
        first = np.flatnonzero(new)
        run = np.cumsum(new) - 1
        run_offset = starts[first]
        run_length = np.maximum.reduceat(ends, first) - run_offset
        run_stage = np.concatenate((np.zeros(1, dtype=np.uint64), np.cumsum(run_length)[:-1]))
        rel = np.empty(len(order), dtype=np.uint64)
        rel[order] = run_stage[run] + starts - run_offset[run]
        return cls(planes, run_offset, run_length, run_stage, rel, int(run_length.sum()))


@dataclass
class _Tile:
    rows: slice
    runs: _Runs
    table: int  # where its kernel segments start in the uploaded table (words)
    layers_done: int  # a load's layer count complete once this tile is in (0: not a group's last)

    @property
    def segments(self) -> int:
        """Kernel segments: one per plane of each of the tile's blocks (3 table words each)."""
        return (self.rows.stop - self.rows.start) * self.runs.planes.size

    def pieces(self, staging: int) -> np.ndarray:
        """Where each of the tile's blocks starts in ``staging`` (a column: one row per block)."""
        count = self.rows.stop - self.rows.start
        return staging + np.arange(count, dtype=np.uint64)[:, None] * np.uint64(self.runs.piece)


class Lane:
    """Copies between GPU blocks and the pinned pool in one direction: ``save`` (GPU to pool) or
    ``load`` (pool to GPU)."""

    def __init__(self, device: Device, direction: str, staging_bytes: int | None = None) -> None:
        if direction not in ("save", "load"):
            raise ValueError(f"direction must be 'save' or 'load', got {direction!r}")
        self.device = device
        self.direction = direction
        self._lock = threading.Lock()
        cu = driver.cu
        device.enter()
        self._function = copy_function(device)
        self._dma = BatchCopier()
        flags = cu.CUstream_flags.CU_STREAM_NON_BLOCKING
        self._dma_stream = check(cu.cuStreamCreate(flags), "cuStreamCreate")
        self._kernel_stream = check(cu.cuStreamCreate(flags), "cuStreamCreate")
        self._filled = [self._new_event(), self._new_event()]  # staging buffer b holds its tile's bytes
        self._free = [self._new_event(), self._new_event()]  # staging buffer b may be reused
        self._marks: list[object] = []  # progress events: a load's layer groups, a save's tiles
        self._staging_bytes = 0
        self._staging: list[int] = []
        self._words = 0
        self._device_table = 0
        self._host_table: np.ndarray | None = None
        self._host_pointer = 0
        self._max_grid = max(1, device.sm_count * 16)  # thread blocks walk segments by stride
        self._want_staging = staging_from_env(staging_bytes or STAGING_BYTES[direction])
        self.fallback_segments = 0  # copied by the driver: pool memory not pinned (yet)
        self._runs_cache: dict[bytes, list[_Runs]] = {}

    # -- requests -------------------------------------------------------------------------------
    def save(self, blocks: Blocks, landed: Callable[[np.ndarray], None] | None = None) -> None:
        """Copy every plane of every block from the GPU into the pool; returns when done.
        ``landed(rows)`` runs as soon as those blocks are whole in the pool, tile by tile, so the
        caller publishes them while later tiles are still moving instead of after the last one."""
        self.save_batches([blocks], landed)

    def save_batches(self, batches: Iterable[Blocks], landed: Callable[[np.ndarray], None] | None = None) -> None:
        """``save`` of one request drawn in batches: each batch's tiles are queued before the next
        batch is drawn, so the caller prepares (reserves, addresses) later blocks while the first
        ones move. ``landed`` rows count the blocks of all batches in order."""
        self._run(batches, lambda blocks: [(np.arange(blocks.offset.size), 0)], None, landed)

    def load(self, blocks: Blocks, layer_planes: Sequence[Sequence[int]],
             done: Callable[[int], None] | None = None) -> None:
        """Copy the pool's blocks into the GPU, layer by layer (``layer_planes[k]``: the planes of
        layer k); ``done(k)`` once layers ``[0, k)`` are complete. Returns when all are."""
        self._run([blocks], lambda b: _layer_groups(layer_planes, b.length), done)

    # -- planning and running -------------------------------------------------------------------
    def _run(self, batches: Iterable[Blocks], groups_of: Callable[[Blocks], list[tuple[np.ndarray, int]]],
             done: Callable[[int], None] | None, landed: Callable[[np.ndarray], None] | None = None) -> None:
        """One request: its batches' tiles queued one batch after the other on the same streams
        (the staging buffers keep alternating, the segment table keeps filling), then waited for."""
        with self._lock:
            self.device.enter()
            progress = _Progress()
            first_row = tiles_queued = table_words = 0
            try:
                for blocks in batches:
                    groups = groups_of(blocks)
                    extent = blocks.offset + blocks.length
                    ok = pinned.covered(blocks.stored, np.full(blocks.stored.shape, extent.max(), dtype=np.uint64))
                    fast, slow = (blocks, None) if ok.all() else (blocks.take(ok), blocks.take(~ok))
                    if slow is not None:
                        self.fallback_segments += slow.engine.size
                    rows = first_row + np.arange(blocks.stored.size)
                    report = _GroupReport(groups, slow, rows[~ok], self._driver_copy, done, landed)
                    tiles, table_words = self._plan(fast, groups, table_words)
                    self._enqueue(fast, rows[ok], tiles, tiles_queued, progress, report)
                    tiles_queued += len(tiles)
                    first_row += blocks.stored.size
                progress.wait_all()
            finally:
                driver.cu.cuStreamSynchronize(self._dma_stream)
                driver.cu.cuStreamSynchronize(self._kernel_stream)

    def _plan(self, blocks: Blocks, groups: list[tuple[np.ndarray, int]], table_start: int) -> tuple[list[_Tile], int]:
        """Tiles in order (boundaries only: each tile's segments are written as it is queued, so
        the first DMA starts after one tile's worth of host work, not the whole request's), their
        segments from word ``table_start`` of the table on; also where the next batch's start."""
        group_runs = self._group_runs(groups, blocks.offset, blocks.length)
        self._reserve_staging(max(r.piece for r in group_runs))
        self._reserve_table(table_start + 3 * blocks.engine.size)
        tiles: list[_Tile] = []
        n_blocks, at, layers = blocks.stored.size, table_start, 0
        for runs, (_, group_layers) in zip(group_runs, groups):
            per_tile = self._staging_bytes // runs.piece
            layers += group_layers
            for lo in range(0, n_blocks, per_tile):
                hi = min(n_blocks, lo + per_tile)
                tiles.append(_Tile(slice(lo, hi), runs, at, layers if hi == n_blocks else 0))
                at += 3 * tiles[-1].segments
            if not n_blocks:
                tiles.append(_Tile(slice(0, 0), runs, at, layers))
        return tiles, at

    def _group_runs(self, groups: list[tuple[np.ndarray, int]], offset: np.ndarray, length: np.ndarray) -> list[_Runs]:
        """Each group's runs; a context's layout gives the same ones every request (kept here, a
        few contexts' worth: ~0.4 ms of numpy per Llama-8B load otherwise)."""
        sizes = np.array([len(planes) for planes, _ in groups], dtype=np.int64)
        key = b"".join([offset.tobytes(), length.tobytes(), sizes.tobytes()] + [planes.tobytes() for planes, _ in groups])
        runs = self._runs_cache.get(key)
        if runs is None:
            if len(self._runs_cache) >= 64:
                self._runs_cache.clear()
            runs = self._runs_cache[key] = [_Runs.of(planes, offset, length) for planes, _ in groups]
        return runs

    def _enqueue(self, blocks: Blocks, rows: np.ndarray, tiles: list[_Tile], first_tile: int, progress: _Progress,
                 report: _GroupReport) -> None:
        """Queue every tile's DMA and kernel on the two streams, with an event marking each layer
        group (a save: the whole batch) complete, and for a save each tile's blocks landed
        (``rows``: the request's row of each of ``blocks``); what is in already is reported on the
        way. ``first_tile``: tiles the request queued before these (its earlier batches), which
        decides the staging buffer each one takes."""
        cu = driver.cu
        saving = self.direction == "save"
        first, second = (self._kernel_stream, self._dma_stream) if saving else (self._dma_stream, self._kernel_stream)
        steps = (self._kernel, self._copy) if saving else (self._copy, self._kernel)
        for t, tile in enumerate(tiles):
            b = (first_tile + t) % 2
            if tile.rows.stop > tile.rows.start:
                self._upload_table(blocks, tile, self._staging[b], first)
                if first_tile + t >= 2:
                    check(cu.cuStreamWaitEvent(first, self._free[b], 0), "cuStreamWaitEvent")
                steps[0](blocks, tile, self._staging[b])
                check(cu.cuEventRecord(self._filled[b], first), "cuEventRecord")
                check(cu.cuStreamWaitEvent(second, self._filled[b], 0), "cuStreamWaitEvent")
                steps[1](blocks, tile, self._staging[b])
                check(cu.cuEventRecord(self._free[b], second), "cuEventRecord")
                if report.landed is not None:
                    progress.add(self._record_mark(len(progress.marks), second), functools.partial(report.landed, rows[tile.rows]))
            if tile.layers_done or saving and t == len(tiles) - 1:
                progress.add(self._record_mark(len(progress.marks), second), report.next_group)
            progress.poll()

    def _copy(self, blocks: Blocks, tile: _Tile, staging: int) -> None:
        """The tile's DMA: one copy per run of each block, between staging and the pool."""
        runs, rows = tile.runs, tile.rows
        stage = tile.pieces(staging) + runs.stage[None, :]
        host = blocks.stored[rows][:, None] + runs.offset[None, :]
        size = np.ascontiguousarray(np.broadcast_to(runs.length[None, :], stage.shape))
        dst, src = (host, stage) if self.direction == "save" else (stage, host)
        self._dma.copy(*_joined(np.ascontiguousarray(dst).ravel(), np.ascontiguousarray(src).ravel(), size.ravel(),
                                pinned.range_index(host.ravel())), int(self._dma_stream))

    def _upload_table(self, blocks: Blocks, tile: _Tile, staging: int, stream: object) -> None:
        """The tile's kernel segments written into the pinned table and uploaded on ``stream``: the
        stream that works on the tile first, ahead of its wait for a free buffer. Queued on a
        load's kernel stream, after the tile's DMA, the upload would wait in the host-to-device
        copy engine behind the next tile's DMA too, and the scatter, with the buffer the DMA
        after next needs, would start a whole tile late (docs/benchmarks.md, session 17)."""
        runs, rows = tile.runs, tile.rows
        count, n = rows.stop - rows.start, tile.segments
        stage = tile.pieces(staging) + runs.rel[None, :]
        engine = blocks.engine[rows][:, runs.planes]
        dst, src = (stage, engine) if self.direction == "save" else (engine, stage)
        table = self._host_table[tile.table : tile.table + 3 * n]
        table[:n] = dst.ravel()
        table[n : 2 * n] = src.ravel()
        table[2 * n :].reshape(count, -1)[:] = blocks.length[runs.planes][None, :]
        check(driver.cu.cuMemcpyHtoDAsync(self._device_table + tile.table * 8, self._host_pointer + tile.table * 8,
                                          3 * n * 8, stream), "cuMemcpyHtoDAsync(segment table)")

    def _kernel(self, blocks: Blocks, tile: _Tile, staging: int) -> None:
        """The tile's gather into (save) or scatter out of (load) staging, on the kernel stream,
        from the segments ``_upload_table`` queued."""
        n = tile.segments
        args = ((self._device_table + tile.table * 8, n), (ctypes.c_void_p, ctypes.c_int))
        check(driver.cu.cuLaunchKernel(self._function, min(n, self._max_grid), 1, 1, THREADS, 1, 1, 0,
                                       self._kernel_stream, args, 0), "cuLaunchKernel(pegaflow_copy_segments)")

    def _driver_copy(self, blocks: Blocks, planes: np.ndarray) -> None:
        """Blocks whose pool memory is not pinned yet (a freshly started daemon still pinning its
        pool): one synchronous driver copy per plane (slow, but only then)."""
        cu = driver.cu
        engine = blocks.engine[:, planes]
        host = blocks.stored[:, None] + blocks.offset[planes][None, :]
        size = np.broadcast_to(blocks.length[planes][None, :], engine.shape)
        for e, h, n in zip(engine.ravel().tolist(), host.ravel().tolist(), size.ravel().tolist()):
            if self.direction == "save":
                check(cu.cuMemcpyDtoH(h, e, n), "cuMemcpyDtoH")
            else:
                check(cu.cuMemcpyHtoD(e, h, n), "cuMemcpyHtoD")

    # -- resources ------------------------------------------------------------------------------
    def _new_event(self) -> object:
        cu = driver.cu
        flags = cu.CUevent_flags.CU_EVENT_DISABLE_TIMING | cu.CUevent_flags.CU_EVENT_BLOCKING_SYNC
        return check(cu.cuEventCreate(flags), "cuEventCreate")

    def _record_mark(self, k: int, stream: object) -> object:
        """The request's k-th progress event, recorded on ``stream`` (events are kept for reuse)."""
        while len(self._marks) <= k:
            self._marks.append(self._new_event())
        check(driver.cu.cuEventRecord(self._marks[k], stream), "cuEventRecord")
        return self._marks[k]

    def _reserve_staging(self, piece: int) -> None:
        """Two buffers of at least one block's piece each (normally STAGING_BYTES of the direction)."""
        want = max(self._want_staging, piece)
        if want <= self._staging_bytes:
            return
        cu = driver.cu
        self._drain()  # an earlier batch of the request may still be using the buffers
        for pointer in self._staging:
            cu.cuMemFree(pointer)
        self._staging = [int(check(cu.cuMemAlloc(want), "cuMemAlloc(staging)")) for _ in range(2)]
        self._staging_bytes = want

    def _reserve_table(self, words: int) -> None:
        if words <= self._words:
            return
        cu = driver.cu
        self._drain()  # an earlier batch's segments may still be on their way to the GPU
        self._free_table()
        words = max(words, 2 * self._words, 1 << 16)
        self._device_table = int(check(cu.cuMemAlloc(words * 8), "cuMemAlloc(segment table)"))
        self._host_pointer = int(check(cu.cuMemHostAlloc(words * 8, 0), "cuMemHostAlloc(segment table)"))
        self._host_table = np.ctypeslib.as_array((ctypes.c_uint64 * words).from_address(self._host_pointer))
        self._words = words

    def _drain(self) -> None:
        """Wait for everything queued on the lane's streams (before its buffers are replaced)."""
        check(driver.cu.cuStreamSynchronize(self._dma_stream), "cuStreamSynchronize")
        check(driver.cu.cuStreamSynchronize(self._kernel_stream), "cuStreamSynchronize")

    def _free_table(self) -> None:
        cu = driver.cu
        if self._device_table:
            cu.cuMemFree(self._device_table)
        if self._host_pointer:
            cu.cuMemFreeHost(self._host_pointer)
        self._device_table = self._host_pointer = self._words = 0
        self._host_table = None

    def close(self) -> None:
        with self._lock:
            self.device.enter()
            cu = driver.cu
            cu.cuStreamSynchronize(self._dma_stream)
            cu.cuStreamSynchronize(self._kernel_stream)
            self._free_table()
            for pointer in self._staging:
                cu.cuMemFree(pointer)
            self._staging, self._staging_bytes = [], 0
            for event in self._filled + self._free + self._marks:
                cu.cuEventDestroy(event)
            self._marks = []
            cu.cuStreamDestroy(self._dma_stream)
            cu.cuStreamDestroy(self._kernel_stream)


def staging_from_env(default: int) -> int:
    """The staging buffer size: ``PEGAFLOW_CUDA_STAGING`` (a size such as "64mb") or ``default``."""
    value = os.environ.get("PEGAFLOW_CUDA_STAGING")
    if not value:
        return default
    try:
        size = parse_size(value)
    except InvalidArgument as exc:
        raise InvalidArgument(f"PEGAFLOW_CUDA_STAGING: {exc}") from None
    if size <= 0:
        raise InvalidArgument(f"PEGAFLOW_CUDA_STAGING: expected a size > 0, got {value!r}")
    return size


class _Progress:
    """Runs each mark's action in order once its event has completed: ``poll`` for those in
    already (while later tiles are still being queued), ``wait_all`` for the rest."""

    def __init__(self) -> None:
        self.marks: list[tuple[object, Callable[[], None]]] = []
        self.reached = 0

    def add(self, event: object, action: Callable[[], None]) -> None:
        self.marks.append((event, action))

    def poll(self) -> None:
        cu = driver.cu
        while self.reached < len(self.marks):
            err = cu.cuEventQuery(self.marks[self.reached][0])
            err = err[0] if isinstance(err, tuple) else err
            if err == cu.CUresult.CUDA_ERROR_NOT_READY:
                return
            check(err, "cuEventQuery")
            self._reach()

    def wait_all(self) -> None:
        while self.reached < len(self.marks):
            check(driver.cu.cuEventSynchronize(self.marks[self.reached][0]), "cuEventSynchronize")
            self._reach()

    def _reach(self) -> None:
        action = self.marks[self.reached][1]
        self.reached += 1
        action()


class _GroupReport:
    """A request's layer groups completed in order (a save has one): the caller hears of its
    layers, and blocks whose pool memory is not pinned are copied by the driver as their group
    comes due."""

    def __init__(self, groups: list[tuple[np.ndarray, int]], slow: Blocks | None, slow_rows: np.ndarray,
                 driver_copy: Callable[[Blocks, np.ndarray], None], done: Callable[[int], None] | None,
                 landed: Callable[[np.ndarray], None] | None) -> None:
        self.groups, self.slow, self.slow_rows, self.driver_copy = groups, slow, slow_rows, driver_copy
        self.done, self.landed = done, landed
        self.reported = 0
        self.layers = 0

    def next_group(self) -> None:
        planes, layers = self.groups[self.reported]
        if self.slow is not None:
            self.driver_copy(self.slow, planes)
        self.reported += 1
        if self.done is not None:
            for k in range(self.layers + 1, self.layers + layers + 1):
                self.done(k)
        self.layers += layers
        if self.reported == len(self.groups) and self.slow is not None and self.landed is not None:
            self.landed(self.slow_rows)


def _joined(dst: np.ndarray, src: np.ndarray, size: np.ndarray,
            pinned_range: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The copies with each one that continues the previous on both sides, in the same pinned
    range of the pool (``pinned_range`` per copy), merged into it. A save into consecutive pool
    slots (a fresh chunk hands them out in order) then crosses PCIe in one piece per tile instead
    of one per block; scattered slots, and slots either side of a pinning chunk's edge, are left
    as they are."""
    if dst.size < 2:
        return dst, src, size
    follows = ((dst[1:] == dst[:-1] + size[:-1]) & (src[1:] == src[:-1] + size[:-1])
               & (pinned_range[1:] == pinned_range[:-1]))
    if not follows.any():
        return dst, src, size
    first = np.flatnonzero(np.concatenate(([True], ~follows)))
    return dst[first], src[first], np.add.reduceat(size, first).astype(np.uint64)


def _layer_groups(layer_planes: Sequence[Sequence[int]], length: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """Consecutive layers merged until a block's share of the group reaches MIN_PIECE bytes:
    ``(planes, number of layers)`` per group, in layer order."""
    groups: list[tuple[np.ndarray, int]] = []
    planes: list[int] = []
    layers = 0
    for layer in layer_planes:
        planes.extend(layer)
        layers += 1
        if int(length[planes].sum()) >= MIN_PIECE:
            groups.append((np.array(planes, dtype=np.int64), layers))
            planes, layers = [], 0
    if layers:
        groups.append((np.array(planes, dtype=np.int64), layers))
    return groups
