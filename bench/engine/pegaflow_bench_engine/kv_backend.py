"""Where the engine keeps KV beyond its own cache: the calls a connector's worker makes.

``PegaflowBackend`` is pegaflow's worker-side client used the way the vLLM connector uses it:
register the KV cache once, one Query per request (asked again while the daemon answers
``loading``, as vLLM's scheduler does), one Load streamed layer by layer, one Save of the new full
blocks. ``reference_backend.ReferenceBackend`` speaks to pegaflow-llm's server with the same
interface, so a workload runs unchanged against either.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pegaflow_core.client import ContextHandle, LoadHandle, PegaflowClient
from pegaflow_core.errors import DaemonUnavailable, PegaflowError

from .kv_cache import PagedKVCache


@dataclass(frozen=True)
class Hit:
    blocks: int
    lease: Any = ""  # the backend's lease: pegaflow's id (str), pegaflow-llm's opaque bytes
    wait_s: float = 0.0  # time spent waiting while the daemon promoted blocks from a lower tier
    queries: int = 1


class LayerLoad(Protocol):
    def wait_layer(self, layer: int) -> None:
        """Return once ``layer`` of every loaded block is in the engine's cache."""

    def finish(self) -> tuple[int, ...]:
        """Wait for the whole load; the block ids that could not be loaded (to recompute)."""


class KVBackend(Protocol):
    name: str

    def register(self, cache: PagedKVCache, namespace: str, instance_id: str, shard: int, tp_rank: int,
                 tp_size: int) -> None: ...

    def lookup(self, hashes: Sequence[bytes]) -> Hit: ...

    def load(self, hit: Hit, block_ids: Sequence[int]) -> LayerLoad: ...

    def save(self, block_ids: Sequence[int], hashes: Sequence[bytes]) -> int: ...

    def close(self) -> None: ...


class _PegaflowLoad:
    def __init__(self, handle: LoadHandle, block_ids: Sequence[int]) -> None:
        self._handle = handle
        self._block_ids = tuple(block_ids)

    def wait_layer(self, layer: int) -> None:
        self._handle.wait_layer(layer)

    def finish(self) -> tuple[int, ...]:
        try:
            return self._handle.wait().failed_block_ids
        except PegaflowError:
            return self._block_ids


class PegaflowBackend:
    """The worker side of a pegaflow connector. A daemon that is down or refuses a call is a miss,
    never an error: the engine recomputes, as a connector must."""

    name = "pegaflow"

    def __init__(self, endpoint: str, memory: str = "auto", loading_timeout_s: float = 30.0,
                 poll_interval_s: float = 0.002) -> None:
        self.client = PegaflowClient(endpoint, timeout_s=30.0, description="pegaflow bench engine")
        self.engine_copy = True  # False: the daemon copies every load (the comparison in ``ttft``)
        self.memory = memory
        self.loading_timeout_s = loading_timeout_s
        self.poll_interval_s = poll_interval_s
        self.handle: ContextHandle | None = None
        self._on_cuda = False

    def register(self, cache: PagedKVCache, namespace: str, instance_id: str, shard: int = 0, tp_rank: int = 0,
                 tp_size: int = 1) -> None:
        self._on_cuda = cache.device.type == "cuda"
        spec = cache.context_spec(namespace, instance_id, shard=shard, tp_rank=tp_rank, tp_size=tp_size, memory=self.memory)
        self.handle = self.client.register_context(spec)

    def lookup(self, hashes: Sequence[bytes]) -> Hit:
        if self.handle is None or not hashes:
            return Hit(0)
        started = time.perf_counter()
        queries = 0
        try:
            while True:
                queries += 1
                reply = self.client.query(self.handle, hashes)
                waited = time.perf_counter() - started
                if not reply.loading or waited > self.loading_timeout_s:
                    return Hit(reply.hit_blocks, reply.lease_id, waited if queries > 1 else 0.0, queries)
                # Blocks are being promoted from a lower tier: ask again (vLLM's scheduler asks on its
                # next step) rather than make the Load wait for the disk.
                self.client.release([reply.lease_id])
                time.sleep(self.poll_interval_s)
        except PegaflowError:
            return Hit(0)

    def load(self, hit: Hit, block_ids: Sequence[int]) -> LayerLoad:
        if self._on_cuda:
            torch.cuda.current_stream().synchronize()  # the daemon writes on its own streams
        return _PegaflowLoad(self.client.load(self.handle, hit.lease, list(block_ids), engine_copy=self.engine_copy),
                             block_ids)

    def engine_copy_ready(self, timeout_s: float = 120.0) -> bool:
        """Wait until this process copies loads itself (engine_copy.py); False when it will not."""
        return self.handle is not None and self.handle.engine_copy_ready(timeout_s)

    def save(self, block_ids: Sequence[int], hashes: Sequence[bytes]) -> int:
        if self.handle is None or not block_ids:
            return 0
        if self._on_cuda:
            torch.cuda.current_stream().synchronize()  # the daemon reads on its own streams
        try:
            return self.client.save(self.handle, list(block_ids), list(hashes)).stored
        except PegaflowError:
            return 0

    def stats(self) -> dict[str, float]:
        try:
            return dict(self.client.stats().counters)
        except DaemonUnavailable:
            return {}

    def close(self) -> None:
        self.client.close()


class NoBackend:
    """No external KV cache: what the engine does without pegaflow (every request computed)."""

    name = "none"

    def register(self, *args: object, **kwargs: object) -> None:
        pass

    def lookup(self, hashes: Sequence[bytes]) -> Hit:
        return Hit(0)

    def load(self, hit: Hit, block_ids: Sequence[int]) -> LayerLoad:
        raise AssertionError("NoBackend never reports a hit")

    def save(self, block_ids: Sequence[int], hashes: Sequence[bytes]) -> int:
        return 0

    def close(self) -> None:
        pass
