"""The GPU engine's own side of a load (pegaflow_core/engine_copy.py): the worker maps the
daemon's pool read-only, registers it with CUDA in its own context, and runs the same staged
lane as the daemon (lanes.py) on its own streams.

Why in the engine's process: there the lane's DMA and scatter kernels overlap with the forward
like any two streams of one context, where the daemon's, from another context, are time-sliced
against it (H100: staged load 48.5 GB/s beside engine-like kernels in the same process, 44.0
from another; warm 10K-token TTFT 36-37 ms against 40 ms in a scratch run; docs/benchmarks.md).

Registering the mapping costs about 0.1-0.2 s per GiB of pool, so it runs on a thread after
registration, chunk by chunk; loads go to the daemon until it is done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from pegaflow_core import pinned
from pegaflow_core.client import ContextSpec
from pegaflow_core.copier import engine_addresses
from pegaflow_core.engine_copy import EngineLoader
from pegaflow_core.tier import SharedPool

from . import driver
from .driver import CudaError, Device, check
from .lanes import Blocks, Lane

log = logging.getLogger("pegaflow.cuda")

_REGISTER_PORTABLE = 0x01  # CU_MEMHOSTREGISTER_PORTABLE
_REGISTER_READ_ONLY = 0x08  # CU_MEMHOSTREGISTER_READ_ONLY: needed for a PROT_READ mapping


class CudaEngineLoader(EngineLoader):
    """Loads into this process's GPU KV cache from the daemon's pool, on a lane of its own."""

    def __init__(self, spec: ContextSpec, pool: SharedPool) -> None:
        devices = {r.device for r in spec.regions}
        if len(devices) != 1:
            raise CudaError(f"a context's KV regions must all be on one GPU, got devices {sorted(devices)}")
        super().__init__(spec, pool)
        try:
            self.device = Device(devices.pop())
        except BaseException:
            super().close()
            raise
        self._lane: Lane | None = None
        self._registered: list[int] = []
        self._closed = False
        self._offsets = np.array(self.layout.plane_offsets(), dtype=np.uint64)
        self._groups = self.layout.layer_groups()
        self._closing = threading.Lock()
        threading.Thread(target=self._register_pool, name="pegaflow-pool-register", daemon=True).start()

    def _register_pool(self) -> None:
        """Page-lock the mapping for DMA: read-only (the engine never writes the pool) and portable
        (any context of this process may copy from it). Chunk by chunk, each faulted in first,
        with pauses: done at once it slowed the engine's own first requests (H100, a 4 GB pool
        registered right after start: a cold prefill of 391 ms took 1.24-1.55 s)."""
        pool = self.pool.pool
        step = pool.chunk_bytes if 0 < pool.chunk_bytes <= pool.data_bytes else pool.data_bytes
        try:
            for start in range(0, pool.data_bytes, step):
                nbytes = min(step, pool.data_bytes - start)
                began = time.monotonic()
                with self._closing:
                    if self._closed:
                        return  # settled in ``finally``
                    self.pool.populate(start, nbytes)
                    self.device.enter()
                    address = self.pool.address + start
                    check(driver.cu.cuMemHostRegister(address, nbytes, _REGISTER_PORTABLE | _REGISTER_READ_ONLY),
                          "cuMemHostRegister(read-only pool)")
                    self._registered.append(address)
                    pinned.add(address, nbytes)
                # Faulting in and pinning hold the process's memory map: pause as long as the
                # chunk took, so the engine's own allocations (cudaMalloc maps memory) get through.
                time.sleep(time.monotonic() - began)
            self.ready = True
            log.info("pegaflow: the daemon's pool %s (%d bytes) is mapped and registered in this process; loads "
                     "are copied here", pool.path, pool.data_bytes)
        except CudaError as exc:
            log.warning("pegaflow: cannot register the daemon's pool with CUDA here (%s); the daemon copies loads", exc)
        finally:
            self.settled.set()

    def copy(self, block_ids: Sequence[int], offsets: np.ndarray, on_layer: Callable[[int], None]) -> None:
        if self._lane is None:
            self._lane = Lane(self.device, "load")
        engine, length = engine_addresses(self.layout, self.regions, block_ids)
        stored = offsets.astype(np.uint64) + np.uint64(self.pool.address)
        self._lane.load(Blocks(engine, stored, self._offsets, length), self._groups, on_layer)

    def close(self) -> None:
        with self._closing:
            self.ready, self._closed = False, True
            self._executor.shutdown(wait=True)
            if self._lane is not None:
                self._lane.close()
                self._lane = None
            self.device.enter()
            for address in self._registered:
                pinned.remove(address)
                driver.cu.cuMemHostUnregister(address)
            self._registered = []
            self.device.close()
        super().close()
