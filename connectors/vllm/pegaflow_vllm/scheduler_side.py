"""The scheduler half of the connector: asks the daemon how much of each request's prefix it
holds, plans which blocks the workers load and save each step, and tracks leases and holds.

Leases: a query pins the hit blocks in the daemon (a lease) so they cannot be evicted between
"hit" and "copied". The scheduler releases a lease as soon as it is not needed: when vLLM loads
fewer tokens than offered (update_state_after_alloc with 0), when the request is preempted,
aborted or finished before loading, and, after a load, when every worker has reported it done
(worker metadata). Leases of a scheduler that dies go with its daemon session.

The scheduler has no KV memory: it registers a query-only context in the workers' namespace (the
daemon answers its Queries and refuses Save/Load on it; see docs/vllm.md, "Query context").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pegaflow_core.client import ContextHandle, ContextSpec, PegaflowClient
from pegaflow_core.errors import PegaflowError
from pegaflow_core.gate import DaemonGate

from .kv_layout import CacheLayout
from .metadata import LoadSpec, PegaflowMetadata, PegaflowWorkerMeta
from .options import ConnectorOptions
from .stats import PegaflowStats

log = logging.getLogger("pegaflow.vllm")

DEFAULT_LEASE_TTL_S = 30.0  # the daemon's default server.lease_ttl


@dataclass
class Lease:
    lease_id: str  # empty for a cached miss
    start_block: int  # request block the lease's first block corresponds to
    limit_block: int  # end of the queried range
    hit_blocks: int
    taken_at: float


@dataclass
class PendingLoad:
    lease: Lease
    block_ids: list[int]
    block_hashes: list[bytes]


@dataclass
class RequestState:
    request: Any
    saved_blocks: int = 0  # leading blocks known to be in the daemon or already handed to a save
    had_save: bool = False
    lease: Lease | None = None
    load: PendingLoad | None = None


class PegaflowScheduler:
    def __init__(self, vllm_config: Any, kv_cache_config: Any, options: ConnectorOptions,
                 layout: CacheLayout, model: str, instance_id: str) -> None:
        transfer = vllm_config.kv_transfer_config
        self.options = options
        self.layout = layout
        self.block_size = layout.block_size
        self.hash_block_size = getattr(kv_cache_config, "hash_block_size", None) or vllm_config.cache_config.block_size
        self.can_load = bool(transfer.is_kv_consumer)
        self.can_save = bool(transfer.is_kv_producer)
        self.namespace = layout.namespace(model, pp_rank=0)
        self.shard = 0
        self.lease_ttl_s = options.lease_ttl_s or DEFAULT_LEASE_TTL_S
        self.client = PegaflowClient(options.endpoint, timeout_s=options.timeout_s,
                                     description=f"vllm scheduler {instance_id}")
        self.gate = DaemonGate(options.endpoint, options.retry_interval_s, "vLLM scheduler", log)
        self.stats = PegaflowStats()
        self._handle: ContextHandle | None = None
        if self.can_load:
            spec = ContextSpec.query_only(self.namespace, layout.block_bytes, f"{instance_id}-scheduler", self.shard)
            # Not registered yet: the client registers it on first use, and again after a daemon
            # restart, so a daemon that is down at startup costs nothing here.
            self._handle = ContextHandle(spec)
        self._requests: dict[str, RequestState] = {}
        self._loads_this_step: list[str] = []
        self._held: list[str] = []
        self._in_flight: set[str] = set()  # leases handed to workers, waiting for their report
        log.info("pegaflow connector (scheduler): daemon %s, namespace %s, %d-token blocks of %d bytes",
                 options.endpoint, self.namespace, self.block_size, layout.block_bytes)

    # -- helpers ----------------------------------------------------------------------------------
    def _state(self, request: Any) -> RequestState:
        state = self._requests.get(request.request_id)
        if state is None:
            state = self._requests[request.request_id] = RequestState(request)
        return state

    def _hashes(self, request: Any) -> list[bytes]:
        """The request's prefix-chain hashes at the KV block size. vLLM may hash finer
        (hash_block_size divides block_size); the last fine hash of a block covers its prefix."""
        hashes = request.block_hashes
        scale = self.block_size // self.hash_block_size
        if scale == 1:
            return list(hashes)
        return [hashes[i] for i in range(scale - 1, len(hashes), scale)]

    def _release(self, lease_ids: Iterable[str]) -> None:
        ids = [lease_id for lease_id in lease_ids if lease_id]
        if not ids:
            return
        try:
            self.client.release(ids)
            self.gate.succeeded()
        except PegaflowError as exc:  # a daemon that is gone holds no leases
            self.gate.failed(exc)

    def _drop_lease(self, state: RequestState) -> None:
        if state.lease is not None:
            self._release([state.lease.lease_id])
            state.lease = None

    # -- vLLM scheduler hooks -------------------------------------------------------------------------
    def on_new_request(self, request: Any) -> None:
        self._state(request)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond ``num_computed_tokens`` whose full blocks the daemon holds, never
        including the prompt's last token (vLLM must compute at least one to sample). Loads are
        synchronous and layer-wise, so the async flag is always False. Daemon down: 0."""
        if not self.can_load or self._handle is None:
            return 0, False
        state = self._state(request)
        start = num_computed_tokens // self.block_size
        hashes = self._hashes(request)
        limit = min(len(hashes), (request.num_tokens - 1) // self.block_size)
        if limit <= start:
            return 0, False
        lease = state.lease
        now = time.monotonic()
        fresh = lease is not None and now - lease.taken_at < self.lease_ttl_s / 2
        if not (fresh and lease.start_block == start and lease.limit_block == limit):
            self._drop_lease(state)
            if not self.gate.open():
                return 0, False
            try:
                result = self.client.query(self._handle, hashes[start:limit], lease_ttl_s=self.options.lease_ttl_s)
            except PegaflowError as exc:
                self.gate.failed(exc)
                self.stats.count(daemon_errors=1)
                return 0, False
            self.gate.succeeded()
            lease = state.lease = Lease(result.lease_id, start, limit, result.hit_blocks, now)
            self.stats.count(query_requests=1, query_hit_tokens=result.hit_blocks * self.block_size)
        if lease.hit_blocks == 0:
            return 0, False
        return (start + lease.hit_blocks) * self.block_size - num_computed_tokens, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        state = self._state(request)
        lease = state.lease
        if num_external_tokens <= 0 or lease is None or lease.hit_blocks == 0:
            self._drop_lease(state)
            return
        count = min(lease.hit_blocks, -(-num_external_tokens // self.block_size))
        block_ids = list(blocks.get_block_ids()[self.layout.group_id][lease.start_block : lease.start_block + count])
        hashes = self._hashes(request)[lease.start_block : lease.start_block + count]
        state.load = PendingLoad(lease, block_ids, hashes)
        state.lease = None
        state.saved_blocks = max(state.saved_blocks, lease.start_block + count)
        self._loads_this_step.append(request.request_id)

    def build_connector_meta(self, scheduler_output: Any, kv_cache_manager: Any) -> PegaflowMetadata:
        meta = PegaflowMetadata()
        for req_id in self._loads_this_step:
            state = self._requests.get(req_id)
            if state is None or state.load is None:
                continue
            load, state.load = state.load, None
            meta.loads.append(LoadSpec(req_id, load.lease.lease_id, self.namespace, self.shard, load.block_ids, load.block_hashes))
            self._in_flight.add(load.lease.lease_id)
        self._loads_this_step = []
        preempted = set(scheduler_output.preempted_req_ids or ())
        for req_id in preempted:
            state = self._requests.get(req_id)
            if state is not None:
                self._drop_lease(state)
        meta.preempted_req_ids = sorted(preempted)
        if self.can_save:
            block_state = getattr(scheduler_output, "kv_connector_block_state", None)
            for req_id, num_new in scheduler_output.num_scheduled_tokens.items():
                self._plan_save(req_id, num_new, meta, block_state, kv_cache_manager)
        meta.held_req_ids, self._held = self._held, []
        return meta

    def _plan_save(self, req_id: str, num_new_tokens: int, meta: PegaflowMetadata, block_state: Any, kv_cache_manager: Any) -> None:
        """Add the request's blocks that become full and computed in this step."""
        state = self._requests.get(req_id)
        if state is None:
            return
        request = state.request
        hashes = self._hashes(request)
        full = min(len(hashes), (request.num_computed_tokens + num_new_tokens) // self.block_size)
        if not self.options.save_decode:
            full = min(full, request.num_prompt_tokens // self.block_size)
        if full <= state.saved_blocks:
            return
        if block_state is not None and req_id in block_state.req_ids:
            table = block_state.resolve_block_ids(req_id)
        else:
            table = kv_cache_manager.get_block_ids(req_id)
        block_ids = table[self.layout.group_id][state.saved_blocks : full]
        if len(block_ids) != full - state.saved_blocks:
            return  # blocks not allocated (cannot happen for scheduled tokens); never save a guess
        meta.save_block_ids.extend(block_ids)
        meta.save_hashes.extend(hashes[state.saved_blocks : full])
        meta.save_req_ids.append(req_id)
        state.saved_blocks = full
        state.had_save = True

    def update_connector_output(self, output: Any) -> None:
        """Release leases every worker finished loading (vLLM merged their reports)."""
        meta = getattr(output, "kv_connector_worker_meta", None)
        if isinstance(meta, PegaflowWorkerMeta) and meta.loaded_leases:
            done = meta.loaded_leases & self._in_flight
            self._in_flight -= done
            self._release(done)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Release what the request still pins; keep its blocks (True) when some of them were
        handed to a save that workers may still be copying, until they report it finished."""
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return False, None
        self._drop_lease(state)
        if state.load is not None:
            self._release([state.load.lease.lease_id])
            state.load = None
        if state.had_save:
            self._held.append(request.request_id)
            return True, None
        return False, None

    def take_stats(self) -> PegaflowStats | None:
        return self.stats.take()

    def shutdown(self) -> None:
        self._release([s.lease.lease_id for s in self._requests.values() if s.lease is not None])
        self.client.close()
