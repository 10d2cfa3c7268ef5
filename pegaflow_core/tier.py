"""The Tier interface: a capacity-bounded store of KV blocks.

A tier stores opaque byte blocks under ``BlockKey``s. It never picks victims by itself: when it is
full, ``put`` answers ``False`` for what did not fit and the tier stack (which knows leases and
recency through the Index) evicts and retries. That keeps policy in one place and lets a tier be a
plain store that a third party can write in an afternoon.

Required methods are abstract. Tiers that hand out views of their own host memory declare
``host_views`` and implement ``reserve``/``commit``/``abort``/``view``: the daemon then copies engine
KV straight into the tier (one copy, no staging), and a block becomes visible only at ``commit``.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .backend import Backend
from .buffers import Buffer
from .device_io import DeviceSegments
from .errors import PluginError
from .keys import BlockKey

if TYPE_CHECKING:
    from .index import Index, Location
    from .transport import Region, Transport


class MemoryKind(enum.Enum):
    """Memory a tier can read or write directly, so the daemon can pick the cheapest path."""

    HOST = "host"
    PINNED_HOST = "pinned_host"
    GPU = "gpu"
    FILE = "file"


@dataclass(frozen=True)
class TierCapabilities:
    memory: frozenset[MemoryKind] = frozenset({MemoryKind.HOST})
    persistent: bool = False  # contents survive close() and a crash; reopened by the same options
    host_views: bool = False  # implements reserve/commit/abort/view
    device_io: bool = False  # implements read_into_device/write_from_device (GPU addresses; device_io.py)


@dataclass(frozen=True)
class TierUsage:
    capacity_bytes: int
    used_bytes: int
    blocks: int


@dataclass(frozen=True)
class SharedPool:
    """A file holding a tier's blocks that another process on this machine may map read-only:
    block offsets (``Tier.ready_offsets``) count from ``data_offset`` in it. No block straddles a
    multiple of ``chunk_bytes`` (0: unknown), so a reader may page-lock it piece by piece."""

    path: str
    data_offset: int
    data_bytes: int
    chunk_bytes: int = 0


@dataclass(frozen=True)
class StackContext:
    """What a tier may need from the daemon beyond its options, handed over once by ``attach``:
    a remote tier reads the cluster index and moves bytes with the transport into the top tier's
    pool, which the daemon registered with that transport as ``pool_region``."""

    node: str
    index: Index
    top: Tier
    transport: Transport | None = None
    pool_region: Region | None = None


class Tier(Backend, ABC):
    """Base class of every tier. Subclasses set ``kind``, ``Options`` and ``capabilities``.

    ``Options`` is a frozen dataclass; the config loader validates the YAML mapping against its
    fields (types, sizes, unknown keys) before the tier is built with ``Tier(options)``.
    All methods are batched and thread-safe: the daemon calls them from several threads at once.
    """

    capabilities: ClassVar[TierCapabilities] = TierCapabilities()

    #: Blocks found corrupt (checksum mismatch) and answered as misses; the daemon exports it.
    integrity_failures: int = 0
    #: With ``device_io``: True when loading this tier's hits straight into GPU memory beats
    #: staging them through the DRAM pool here (``device_io.load_route`` reads it per request).
    direct_loads: bool = False
    #: True while the tier is still preparing its memory in the background (it serves meanwhile,
    #: more slowly); Health reports it so benchmarks can wait.
    warming: bool = False

    # -- required -------------------------------------------------------------------------
    @abstractmethod
    def put(self, keys: Sequence[BlockKey], blocks: Sequence[Buffer]) -> list[bool]:
        """Copy each block in under its key. ``False`` where there was no room; a key already
        stored is left as is and answers ``True``. Raises InvalidArgument on bad input, storing
        nothing of the batch."""

    @abstractmethod
    def get_into(self, keys: Sequence[BlockKey], dests: Sequence[Buffer]) -> list[bool]:
        """Copy each stored block into the writable buffer beside it; ``False`` for a miss.
        A destination whose size differs from the stored block raises InvalidArgument."""

    def get_into_located(self, keys: Sequence[BlockKey], dests: Sequence[Buffer],
                         locations: Sequence[Sequence[Location]],
                         verified: list[int | None] | None = None,
                         delivered: Callable[[list[int]], None] | None = None) -> list[bool]:
        """``get_into``, told where the index placed each key a moment ago (``locations[i]`` for
        ``keys[i]``, from the caller's lease): a tier that would look its keys up in the index
        (the remote tier, in Redis) skips that round trip. The default ignores them.

        ``verified``, when given, is a list of ``len(keys)`` entries: a tier that checked a
        delivered block's bytes against a checksum of this node's algorithm
        (``pegaflow_core.checksum``) writes that checksum at the block's position, so the caller
        can hand it to ``commit`` instead of having the block hashed again. The default leaves
        it as it is.

        ``delivered``, when given, may be called before this returns, from any thread, with
        positions whose bytes are in their destinations for good (checked, and their
        ``verified`` entries written): the caller commits them at once while the rest still
        move. A position reported there counts as a hit whatever the answer says; a block that
        fails later (the rest of a read is cut) is simply not reported. The default never
        calls it."""
        return self.get_into(keys, dests)

    @abstractmethod
    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Which keys are stored (committed)."""

    @abstractmethod
    def evict(self, keys: Sequence[BlockKey]) -> int:
        """Drop these keys (missing ones are ignored); return how many were dropped."""

    @abstractmethod
    def usage(self) -> TierUsage: ...

    @abstractmethod
    def close(self) -> None:
        """Release resources. Persistent tiers keep their contents for the next open."""

    def attach(self, context: StackContext) -> None:
        """Called once by the daemon after every component is built; most tiers need nothing."""

    # -- capability: persistent ----------------------------------------------------------------
    def recovered(self) -> list[tuple[BlockKey, int]]:
        """``(key, nbytes)`` of every block a persistent tier found when it was opened (a
        re-attached pool, SSD segments), so the daemon can index them again. Called once, at
        start. Tiers that start empty return ``[]``."""
        return []

    # -- capability: host_views ----------------------------------------------------------------
    def reserve(self, keys: Sequence[BlockKey], nbytes: int) -> list[memoryview | None]:
        """Writable views of ``nbytes`` each, invisible until ``commit``; ``None`` where full."""
        raise PluginError(f"tier {self.kind!r} does not offer host views")

    def commit(self, keys: Sequence[BlockKey], checksums: Sequence[int | None] | None = None) -> None:
        """Make reserved blocks visible. ``checksums`` (one per key, ``None`` where unknown): the
        checksum (this node's algorithm) the caller has verified the written bytes against; a
        tier that seals its blocks records it instead of hashing the block again."""
        raise PluginError(f"tier {self.kind!r} does not offer host views")

    def abort(self, keys: Sequence[BlockKey]) -> None:
        raise PluginError(f"tier {self.kind!r} does not offer host views")

    def view(self, keys: Sequence[BlockKey]) -> list[memoryview | None]:
        """Read-only views of committed blocks, valid while the caller holds a lease on them."""
        raise PluginError(f"tier {self.kind!r} does not offer host views")

    # -- capability: a pool engines map ---------------------------------------------------------
    def shared_pool(self) -> SharedPool | None:
        """The file an engine process may map to copy this tier's blocks itself (the engine-side
        load, docs/design.md); None (the default) when there is none."""
        return None

    def ready_offsets(self, keys: Sequence[BlockKey]) -> Any:
        """Per key (an int64 array), the stored block's offset in ``shared_pool()``'s data region
        when its bytes may be read as they are now, else -1 (missing, or to be verified first).
        Valid while a lease holds them. Called on the daemon's event loop: keep it cheap."""
        raise PluginError(f"tier {self.kind!r} does not share its pool")

    # -- capability: device_io -----------------------------------------------------------------
    def read_into_device(self, keys: Sequence[BlockKey], dests: Sequence[DeviceSegments]) -> list[bool]:
        """Copy each stored block into GPU memory: ``dests[i]`` is a list of ``(device address,
        nbytes)`` segments that together take the block's bytes in order. ``False`` for a miss or
        a block that failed verification; the contents of such a destination are unspecified
        (the caller recomputes it). Bad input (sizes, non-GPU addresses) raises InvalidArgument
        before any byte moves. The caller keeps the memory alive until the call returns."""
        raise PluginError(f"tier {self.kind!r} does not offer device I/O")

    def write_from_device(self, keys: Sequence[BlockKey], sources: Sequence[DeviceSegments]) -> list[bool]:
        """``put`` from GPU memory: ``sources[i]`` are the segments of block i in order. Same
        answers as ``put`` (False where full, True for a key already stored)."""
        raise PluginError(f"tier {self.kind!r} does not offer device I/O")

    # -- context manager -----------------------------------------------------------------------
    def __enter__(self) -> Tier:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
