"""Engine memory kinds: how the daemon reaches one kind of engine KV memory and moves blocks
between it and tier memory.

A region's ``kind`` in RegisterContext (``shm``, ``cma``, ``cuda_ipc``, or a third party's) picks
an ``EngineMemory`` backend from the plugin registry (role ``memory``), so the GPU data path lives
in its own distribution (pegaflow-cuda) with its heavy imports, and core stays CPU-only. The daemon
builds one instance per kind on first use and keeps it: that instance owns the kind's copy
resources (threads, CUDA streams, compiled kernels, opened IPC handles).

Tier memory is always host memory the stack hands out as views (pinned when a GPU is present), so
every kind implements the same two moves: ``gather`` engine blocks into stored blocks (Save) and
``scatter`` stored blocks into engine blocks layer by layer (Load).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .backend import Backend
from .buffers import joined
from .contexts import EngineRegion
from .layout import KVLayout

if TYPE_CHECKING:
    from .client import ContextSpec
    from .engine_copy import EngineLoader
    from .tier import SharedPool

#: ``landed(indices)``: the stored blocks at these indices of a gather's ``dests`` are whole.
Landed = Callable[[Sequence[int]], None]
#: A save's ``(block_ids, dests)`` in batches, each batch's slots reserved as it is drawn.
Batches = Iterable[tuple[Sequence[int], Sequence[memoryview]]]


@dataclass(frozen=True)
class RegionRequest:
    """One region as the engine described it (the RegisterContext message's fields)."""

    index: int
    kind: str
    nbytes: int
    path: str = ""
    handle: bytes = b""
    device: int = -1
    device_uuid: str = ""
    pid: int = 0
    address: int = 0

    @property
    def where(self) -> str:
        """Names the region in error messages."""
        return f"regions[{self.index}]"


class EngineMemory(Backend):
    """Base class of memory kinds. Instances are built with ``cls()`` by the daemon."""

    kind: ClassVar[str]
    #: Regions of this kind are GPU memory: their addresses are device addresses, so a tier with
    #: device I/O (pegaflow-gds) may read hits straight into them (``device_io.load_route``).
    device_memory: ClassVar[bool] = False

    def open(self, region: RegionRequest) -> EngineRegion:
        """Map or attach ``region`` once, at registration; raise InvalidArgument naming
        ``region.where`` when it cannot be reached."""
        raise NotImplementedError

    def gather(self, layout: KVLayout, regions: Sequence[EngineRegion], block_ids: Sequence[int],
               dests: Sequence[memoryview], landed: Landed | None = None) -> None:
        """Copy engine block ``block_ids[i]`` (all planes) into ``dests[i]``; return when done.
        A kind that copies in pieces may call ``landed(indices)`` as soon as those ``dests`` are
        whole, so the daemon publishes them while the rest are still moving; blocks never reported
        are published when gather returns."""
        raise NotImplementedError

    def gather_batches(self, layout: KVLayout, regions: Sequence[EngineRegion], batches: Batches,
                       landed: Landed | None = None) -> None:
        """``gather`` of a save whose slots the daemon reserves batch by batch as they are drawn
        (the first batch small); ``landed`` indices count the ``dests`` of all batches in order.
        Every batch must be drawn. The default draws them all and gathers once (a synchronous
        copy gains nothing from batches); a kind that copies asynchronously (the GPU lanes)
        queues a batch's copies before drawing the next, so the first blocks move while the later
        ones' slots are still being reserved."""
        block_ids: list[int] = []
        dests = []
        for ids, batch in batches:
            block_ids.extend(ids)
            dests.append(batch)
        self.gather(layout, regions, block_ids, joined(dests), landed)

    def scatter(self, layout: KVLayout, regions: Sequence[EngineRegion], block_ids: Sequence[int],
                sources: Sequence[memoryview | None], on_layer: Callable[[int], None] | None = None) -> None:
        """Copy ``sources[i]`` into engine block ``block_ids[i]`` (``None`` sources are skipped);
        call ``on_layer(k)`` as soon as layers ``[0, k)`` are in place, so the engine can start
        computing layer 0 while later layers are still moving."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the kind's copy resources (after every region was closed)."""

    @classmethod
    def engine_loader(cls, spec: ContextSpec, pool: SharedPool) -> EngineLoader | None:
        """Called in the engine's process, not the daemon's: a loader that copies blocks from the
        daemon's ``pool`` into the KV memory ``spec`` registers (engine_copy.py), or None (the
        default) to leave every load to the daemon."""
        return None
