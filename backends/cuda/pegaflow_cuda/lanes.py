"""A lane: one direction of copies on one GPU (saves D2H, loads H2D), so a save and a load run at
once on PCIe's two directions.

A lane owns a CUDA stream, the segment table on the device and a pinned host copy of it to upload
from, and one event per layer. A copy request is a list of parts (a load's parts are its layers):
the whole table goes up in one upload, each part is one kernel launch, and the caller hears about
part k as soon as its event completes, while later parts are still moving.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pegaflow_core import pinned

from . import driver
from .driver import Device, check
from .kernels import THREADS, copy_function


@dataclass
class Part:
    """Segments to copy: destination, source and length arrays (uint64, equal length)."""

    dst: np.ndarray
    src: np.ndarray
    length: np.ndarray


class Lane:
    def __init__(self, device: Device, host_side: str) -> None:
        if host_side not in ("dst", "src"):
            raise ValueError(f"host_side must be 'dst' or 'src', got {host_side!r}")
        self.device = device
        self.host_side = host_side
        self._lock = threading.Lock()
        cu = driver.cu
        device.enter()
        self._function = copy_function(device)
        self._stream = check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate")
        self._events: list[object] = []
        self._words = 0
        self._device_table = 0
        self._host_table: np.ndarray | None = None
        self._host_pointer = 0
        # Enough thread blocks to fill every SM several times over; each walks segments by stride.
        self._max_grid = max(1, device.sm_count * 16)
        self.fallback_segments = 0  # copied by the driver: host side not pinned (yet)

    def run(self, parts: Sequence[Part], done: Callable[[int], None] | None = None) -> None:
        """Copy every part; ``done(k)`` once parts ``[0, k)`` are complete. Returns when all are."""
        with self._lock:
            self.device.enter()
            kernel_parts, driver_parts = zip(*(self._split(p) for p in parts)) if parts else ((), ())
            offsets = self._upload(kernel_parts)
            for k, (part, offset) in enumerate(zip(kernel_parts, offsets)):
                if part.dst.size:
                    self._launch(offset, part.dst.size)
                check(driver.cu.cuEventRecord(self._event(k), self._stream), "cuEventRecord")
            for k, slow in enumerate(driver_parts):
                check(driver.cu.cuEventSynchronize(self._event(k)), "cuEventSynchronize")
                self._driver_copy(slow)
                if done is not None:
                    done(k + 1)

    def _split(self, part: Part) -> tuple[Part, Part]:
        """The segments the kernel may do (host side pinned and device-mapped) and the rest."""
        host = part.dst if self.host_side == "dst" else part.src
        ok = pinned.covered(host, part.length) if self.device.host_pointers else np.zeros(host.shape, dtype=bool)
        if ok.all():
            return part, Part(host[:0], host[:0], host[:0])
        bad = ~ok
        self.fallback_segments += int(bad.sum())
        return (Part(part.dst[ok], part.src[ok], part.length[ok]),
                Part(part.dst[bad], part.src[bad], part.length[bad]))

    def _upload(self, parts: Sequence[Part]) -> list[int]:
        """Write every part's table into the pinned staging area, then one async upload."""
        words = sum(3 * p.dst.size for p in parts)
        self._reserve(words)
        offsets, at = [], 0
        assert self._host_table is not None or words == 0
        for p in parts:
            n = p.dst.size
            offsets.append(at)
            if n:
                table = self._host_table[at : at + 3 * n]
                table[:n], table[n : 2 * n], table[2 * n :] = p.dst, p.src, p.length
            at += 3 * n
        if words:
            check(driver.cu.cuMemcpyHtoDAsync(self._device_table, self._host_pointer, words * 8, self._stream),
                  "cuMemcpyHtoDAsync(segment table)")
        return offsets

    def _launch(self, offset: int, n: int) -> None:
        grid = min(n, self._max_grid)
        args = ((self._device_table + offset * 8, n), (ctypes.c_void_p, ctypes.c_int))
        check(driver.cu.cuLaunchKernel(self._function, grid, 1, 1, THREADS, 1, 1, 0, self._stream, args, 0),
              "cuLaunchKernel(pegaflow_copy_segments)")

    def _driver_copy(self, part: Part) -> None:
        """Segments whose host side is not pinned: one synchronous driver copy each (slow, but
        only while a freshly started daemon is still pinning its pool)."""
        cu = driver.cu
        for d, s, n in zip(part.dst.tolist(), part.src.tolist(), part.length.tolist()):
            if self.host_side == "dst":
                check(cu.cuMemcpyDtoH(d, s, n), "cuMemcpyDtoH")
            else:
                check(cu.cuMemcpyHtoD(d, s, n), "cuMemcpyHtoD")

    def _event(self, k: int) -> object:
        cu = driver.cu
        while len(self._events) <= k:
            flags = cu.CUevent_flags.CU_EVENT_DISABLE_TIMING | cu.CUevent_flags.CU_EVENT_BLOCKING_SYNC
            self._events.append(check(cu.cuEventCreate(flags), "cuEventCreate"))
        return self._events[k]

    def _reserve(self, words: int) -> None:
        if words <= self._words:
            return
        cu = driver.cu
        self._free_tables()
        words = max(words, 2 * self._words, 1 << 16)
        self._device_table = int(check(cu.cuMemAlloc(words * 8), "cuMemAlloc(segment table)"))
        self._host_pointer = int(check(cu.cuMemHostAlloc(words * 8, 0), "cuMemHostAlloc(segment table)"))
        self._host_table = np.ctypeslib.as_array((ctypes.c_uint64 * words).from_address(self._host_pointer))
        self._words = words

    def _free_tables(self) -> None:
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
            cu.cuStreamSynchronize(self._stream)
            self._free_tables()
            for event in self._events:
                cu.cuEventDestroy(event)
            self._events = []
            cu.cuStreamDestroy(self._stream)
