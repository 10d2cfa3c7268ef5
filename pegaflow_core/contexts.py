"""Engine contexts: one registered KV cache (one engine rank) and the memory the daemon mapped
for it. Mapping happens once, at registration; every later Save/Load only names block ids."""

from __future__ import annotations

import itertools
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import InvalidArgument, NotFound
from .keys import BlockKey, KeyCache
from .layout import KVLayout
from .shm import SharedRegion

if TYPE_CHECKING:
    from .memory import EngineMemory


@dataclass
class EngineRegion:
    """One registered piece of engine KV memory, as its memory kind reaches it: ``base`` is an
    address in this process (a mapped shared-memory file, or a device pointer of an opened CUDA
    IPC handle on ``device``) or in the engine process ``pid`` (cross-memory attach).
    ``release`` undoes the mapping."""

    kind: str
    nbytes: int
    base: int
    pid: int = 0
    device: int = -1
    release: Callable[[], None] | None = None

    @classmethod
    def mapped(cls, shm: SharedRegion) -> EngineRegion:
        return cls("shm", shm.nbytes, shm.array.__array_interface__["data"][0], release=shm.close)

    def close(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            release()


@dataclass
class EngineContext:
    context_id: str
    session_id: str
    instance_id: str
    namespace: str
    shard: int
    layout: KVLayout | None  # None: a query-only context (no KV memory)
    regions: list[EngineRegion]
    device: int = -1
    tp_rank: int = 0
    tp_size: int = 1
    query_block_bytes: int = 0
    memory: EngineMemory | None = None  # the memory kind that opened ``regions`` and copies for them
    # Keys by hash, shared by the contexts of one namespace and shard once in a ContextTable.
    key_cache: KeyCache = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.key_cache is None:
            self.key_cache = KeyCache(self.namespace, self.shard)

    @property
    def block_bytes(self) -> int:
        return self.layout.block_bytes if self.layout is not None else self.query_block_bytes

    def kv_layout(self) -> KVLayout:
        """The layout for Save and Load; a query-only context has none."""
        if self.layout is None:
            raise InvalidArgument(
                f"context {self.context_id} was registered for queries only (no KV memory): it can Query, "
                "not Save or Load"
            )
        return self.layout

    def keys(self, block_hashes: Sequence[bytes]) -> list[BlockKey]:
        return self.key_cache.keys(list(block_hashes))

    def close(self) -> None:
        for region in self.regions:
            region.close()


class ContextTable:
    """Registered contexts by id and by session. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, EngineContext] = {}
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(4)
        self._key_caches: dict[tuple[str, int], KeyCache] = {}

    def new_id(self) -> str:
        return f"ctx-{self._prefix}-{next(self._ids)}"

    def add(self, context: EngineContext) -> None:
        with self._lock:
            for other in self._by_id.values():
                if (
                    other.session_id
                    and other.session_id == context.session_id
                    and other.instance_id == context.instance_id
                    and other.tp_rank == context.tp_rank
                    and other.shard == context.shard
                    and other.namespace == context.namespace
                ):
                    raise InvalidArgument(
                        f"instance {context.instance_id!r} rank {context.tp_rank} is already registered in this "
                        f"session as {other.context_id}; unregister it first"
                    )
            self._by_id[context.context_id] = context
            context.key_cache = self._key_caches.setdefault((context.namespace, context.shard), context.key_cache)

    def get(self, context_id: str) -> EngineContext:
        with self._lock:
            context = self._by_id.get(context_id)
        if context is None:
            raise NotFound(f"unknown context {context_id!r}: register the KV cache first (the daemon may have restarted)")
        return context

    def pop(self, context_id: str) -> EngineContext:
        with self._lock:
            context = self._by_id.pop(context_id, None)
        if context is None:
            raise NotFound(f"unknown context {context_id!r}")
        self._drop_unused_caches()
        return context

    def pop_session(self, session_id: str) -> list[EngineContext]:
        with self._lock:
            gone = [c for c in self._by_id.values() if c.session_id == session_id]
            for c in gone:
                del self._by_id[c.context_id]
        self._drop_unused_caches()
        return gone

    def _drop_unused_caches(self) -> None:
        """Forget the key caches of namespaces and shards no context uses any more."""
        with self._lock:
            used = {(c.namespace, c.shard) for c in self._by_id.values()}
            for gone in self._key_caches.keys() - used:
                del self._key_caches[gone]

    def __len__(self) -> int:
        return len(self._by_id)

    def all(self) -> list[EngineContext]:
        with self._lock:
            return list(self._by_id.values())
