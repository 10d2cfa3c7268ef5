"""Built-in plugin: the host-memory kinds every daemon serves.

``shm``: the engine's KV cache is a file under /dev/shm that the daemon maps; ``cma``: plain
memory of the engine process, reached with process_vm_readv/writev. Both copy with HostCopier
(native streaming copies, or CMA batches) on a few threads. A ``cma`` engine may also load by
itself from the daemon's pool mapped in its process (engine_copy.py), with the same copier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pegaflow_core import cma
from pegaflow_core.client import ContextSpec
from pegaflow_core.contexts import EngineRegion
from pegaflow_core.copier import HostCopier
from pegaflow_core.engine_copy import EngineLoader
from pegaflow_core.errors import InvalidArgument
from pegaflow_core.hookspecs import Register, hookimpl
from pegaflow_core.layout import KVLayout
from pegaflow_core.memory import EngineMemory, Landed, RegionRequest
from pegaflow_core.shm import SharedRegion
from pegaflow_core.tier import SharedPool


class _HostMemory(EngineMemory):
    def __init__(self) -> None:
        self.copier = HostCopier()

    def gather(self, layout: KVLayout, regions: Sequence[EngineRegion], block_ids: Sequence[int],
               dests: Sequence[memoryview], landed: Landed | None = None) -> None:
        self.copier.gather(layout, regions, block_ids, dests)

    def scatter(self, layout: KVLayout, regions: Sequence[EngineRegion], block_ids: Sequence[int],
                sources: Sequence[memoryview | None], on_layer: Callable[[int], None] | None = None) -> None:
        self.copier.scatter(layout, regions, block_ids, sources, on_layer)

    def close(self) -> None:
        self.copier.close()


class SharedFileMemory(_HostMemory):
    """KV memory in a /dev/shm file the daemon maps (zero-copy for both sides)."""

    kind = "shm"

    def open(self, region: RegionRequest) -> EngineRegion:
        try:
            return EngineRegion.mapped(SharedRegion.attach(region.path, region.nbytes))
        except InvalidArgument as exc:
            raise InvalidArgument(f"{region.where}: {exc}") from None


class CrossMemoryAttach(_HostMemory):
    """KV memory of the engine process itself (vLLM's CPU backend allocates it with torch)."""

    kind = "cma"

    def open(self, region: RegionRequest) -> EngineRegion:
        try:
            cma.check_access(region.pid, region.address, region.nbytes)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{region.where}: {exc}") from None
        return EngineRegion("cma", region.nbytes, region.address, region.pid)

    @classmethod
    def engine_loader(cls, spec: ContextSpec, pool: SharedPool) -> EngineLoader | None:
        return _HostEngineLoader(spec, pool) if all(r.address for r in spec.regions) else None


class _HostEngineLoader(EngineLoader):
    """The engine copies from the mapped pool into its own memory: no process_vm_writev, no Load
    stream; the daemon only answers where the blocks are."""

    def __init__(self, spec: ContextSpec, pool: SharedPool) -> None:
        super().__init__(spec, pool)
        self.copier = HostCopier()
        self.ready = True
        self.settled.set()

    def copy(self, block_ids: Sequence[int], offsets: np.ndarray, on_layer: Callable[[int], None]) -> None:
        starts = offsets.astype(np.uint64) + np.uint64(self.pool.address)
        self.copier.scatter_from(self.layout, self.regions, block_ids, starts, on_layer)

    def close(self) -> None:
        super().close()
        self.copier.close()


@hookimpl
def register_memory_kinds(register: Register) -> None:
    """Register the shm and cma memory kinds."""
    register(SharedFileMemory)
    register(CrossMemoryAttach)
