"""Memory kind ``cuda_ipc``: an engine's GPU KV cache, opened in the daemon with its CUDA IPC
handle, and the batched copies between it and the pinned pool.

An engine exports each KV allocation once (``pegaflow_core.regions.region_for_storage``); the
daemon opens it on the GPU with the same UUID and keeps it open until the context goes away (the
engine's memory stays allocated while the daemon holds it, so the session watcher's unregister
after an engine crash is what frees it). Saves and loads then only name block ids: the daemon
computes the addresses and a lane (lanes.py) moves them by DMA through GPU staging buffers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np

from pegaflow_core.backend import Availability
from pegaflow_core.buffers import pick
from pegaflow_core.client import ContextSpec
from pegaflow_core.contexts import EngineRegion
from pegaflow_core.copier import block_addresses
from pegaflow_core.engine_copy import EngineLoader
from pegaflow_core.errors import InvalidArgument, PegaflowError
from pegaflow_core.layout import KVLayout
from pegaflow_core.memory import Batches, EngineMemory, Landed, RegionRequest
from pegaflow_core.tier import SharedPool

from . import driver
from .driver import CudaError, Device, check
from .lanes import Blocks, Lane

IPC_HANDLE_BYTES = 64


class _GpuState:
    """What the daemon keeps per GPU: its context and one lane per direction."""

    def __init__(self, ordinal: int) -> None:
        self.device = Device(ordinal)
        self.save = Lane(self.device, "save")
        self.load = Lane(self.device, "load")

    def close(self) -> None:
        self.save.close()
        self.load.close()
        self.device.close()


class CudaIpcMemory(EngineMemory):
    """GPU KV memory reached over CUDA IPC; copies by the segment kernel (see kernels.py)."""

    kind = "cuda_ipc"
    device_memory = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gpus: dict[int, _GpuState] = {}
        self._opened: dict[tuple[int, bytes], list[int]] = {}  # (gpu, handle) -> [pointer, users]

    @classmethod
    def availability(cls) -> Availability:
        try:
            count = driver.device_count()
        except CudaError as exc:
            return Availability(False, str(exc))
        if count == 0:
            return Availability(False, "no CUDA device visible")
        names = sorted({driver.device_name(i) for i in range(count)})
        return Availability(True, f"{count} GPU(s): {', '.join(names)}; copy kernel compiled with NVRTC at first use")

    # -- registration ---------------------------------------------------------------------------
    def open(self, region: RegionRequest) -> EngineRegion:
        if len(region.handle) != IPC_HANDLE_BYTES:
            raise InvalidArgument(f"{region.where}.handle: a CUDA IPC memory handle is {IPC_HANDLE_BYTES} bytes, got {len(region.handle)}")
        if region.nbytes <= 0:
            raise InvalidArgument(f"{region.where}.nbytes must be > 0, got {region.nbytes}")
        try:
            ordinal = driver.find_device(region.device_uuid, region.device)
        except CudaError as exc:
            raise InvalidArgument(f"{region.where}: {exc}") from None
        try:
            gpu = self._gpu(ordinal)
        except CudaError as exc:
            raise PegaflowError(f"the GPU data path could not start on GPU {ordinal}: {exc}") from None
        try:
            pointer = self._open_handle(gpu.device, region.handle)
        except CudaError as exc:
            raise InvalidArgument(
                f"{region.where}: cannot open the engine's CUDA IPC handle: {exc} (the engine must be alive, on this "
                "machine, and export a cudaMalloc'd allocation)"
            ) from None
        key = (ordinal, region.handle)
        try:
            base, size = check(driver.cu.cuMemGetAddressRange(pointer), "cuMemGetAddressRange")
            if region.nbytes > int(size):
                raise InvalidArgument(f"{region.where}: the registration says {region.nbytes} bytes but the exported "
                                      f"allocation has {int(size)}")
        except BaseException:
            self._close_handle(key)
            raise
        return EngineRegion("cuda_ipc", region.nbytes, pointer, device=ordinal, release=lambda: self._close_handle(key))

    def _gpu(self, ordinal: int) -> _GpuState:
        with self._lock:
            gpu = self._gpus.get(ordinal)
            if gpu is None:
                gpu = self._gpus[ordinal] = _GpuState(ordinal)
            return gpu

    def _open_handle(self, device: Device, handle: bytes) -> int:
        """Open ``handle`` once per GPU: CUDA refuses to open the same allocation twice in one
        process, and two regions (or two registrations) may name the same one."""
        key = (device.ordinal, handle)
        device.enter()  # also when found: the caller's driver calls on the pointer need the context
        with self._lock:
            found = self._opened.get(key)
            if found is not None:
                found[1] += 1
                return found[0]
            cu = driver.cu
            ipc = cu.CUipcMemHandle()
            ipc.reserved = handle
            flags = cu.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
            pointer = int(check(cu.cuIpcOpenMemHandle(ipc, flags), "cuIpcOpenMemHandle"))
            self._opened[key] = [pointer, 1]
            return pointer

    def _close_handle(self, key: tuple[int, bytes]) -> None:
        with self._lock:
            found = self._opened.get(key)
            if found is None:
                return
            found[1] -= 1
            if found[1]:
                return
            del self._opened[key]
            self._gpus[key[0]].device.enter()
            # The engine may be gone already; its memory is freed once we close our mapping.
            driver.cu.cuIpcCloseMemHandle(found[0])

    # -- copies ---------------------------------------------------------------------------------
    def gather(self, layout: KVLayout, regions: Sequence[EngineRegion], block_ids: Sequence[int],
               dests: Sequence[memoryview], landed: Landed | None = None) -> None:
        if not block_ids:
            return
        gpu = self._gpus[_one_device(regions)]
        gpu.save.save(_blocks(layout, regions, block_ids, dests), landed)

    def gather_batches(self, layout: KVLayout, regions: Sequence[EngineRegion], batches: Batches,
                       landed: Landed | None = None) -> None:
        """One lane request for all batches: a batch's tiles are queued (and moving) before the
        next batch's slots are reserved and its addresses computed."""
        gpu = self._gpus[_one_device(regions)]
        gpu.save.save_batches((_blocks(layout, regions, ids, dests) for ids, dests in batches if len(ids)), landed)

    def scatter(self, layout: KVLayout, regions: Sequence[EngineRegion], block_ids: Sequence[int],
                sources: Sequence[memoryview | None], on_layer: Callable[[int], None] | None = None) -> None:
        rows = [i for i, s in enumerate(sources) if s is not None]
        groups = layout.layer_groups()
        if not rows:
            for done in range(1, len(groups) + 1):
                if on_layer is not None:
                    on_layer(done)
            return
        gpu = self._gpus[_one_device(regions)]
        blocks = _blocks(layout, regions, [block_ids[i] for i in rows], pick(sources, rows))
        gpu.load.load(blocks, groups, on_layer)

    @classmethod
    def engine_loader(cls, spec: ContextSpec, pool: SharedPool) -> EngineLoader | None:
        """The engine process's own lane (engine_loader.py), when the spec says where its regions
        start in that process."""
        if not all(r.address for r in spec.regions):
            return None
        from .engine_loader import CudaEngineLoader

        return CudaEngineLoader(spec, pool)

    def fallback_segments(self) -> int:
        """Segments copied by the driver because their pool memory was not pinned yet."""
        with self._lock:
            return sum(g.save.fallback_segments + g.load.fallback_segments for g in self._gpus.values())

    def close(self) -> None:
        with self._lock:
            for (ordinal, _), (pointer, _) in list(self._opened.items()):
                self._gpus[ordinal].device.enter()
                driver.cu.cuIpcCloseMemHandle(pointer)
            self._opened.clear()
            for gpu in self._gpus.values():
                gpu.close()
            self._gpus.clear()


def _one_device(regions: Sequence[EngineRegion]) -> int:
    devices = {r.device for r in regions}
    if len(devices) != 1:
        raise InvalidArgument(f"a context's KV regions must all be on one GPU, got devices {sorted(devices)}")
    return devices.pop()


def _blocks(layout: KVLayout, regions: Sequence[EngineRegion], block_ids: Sequence[int],
            stored: Sequence[memoryview]) -> Blocks:
    engine, starts, length = block_addresses(layout, regions, block_ids, stored)
    offset = np.array(layout.plane_offsets(), dtype=np.uint64)
    return Blocks(engine, starts, offset, length)
