"""The worker half of the connector: registers the KV cache with the daemon once, then per step
starts the planned loads, lets each attention layer wait for its own layer, and hands the
step's full blocks to the daemon in ONE Save RPC.

Saves are asynchronous (a single background thread, so they stay in order) unless the role is
kv_producer or ``pegaflow.sync_save`` is set: vLLM keeps the blocks of a finished request until
every worker reports its save done (get_finished), and a preemption drains pending saves before
the freed blocks can be overwritten (handle_preemptions).

Failures never reach the model: a block that could not be loaded is reported through
get_block_ids_with_load_errors and vLLM recomputes it.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pegaflow_core.client import ContextHandle, ContextSpec, LoadHandle, PegaflowClient
from pegaflow_core.errors import DaemonUnavailable, PegaflowError
from pegaflow_core.gate import DaemonGate
from pegaflow_core.layout import Plane

from .kv_layout import CacheLayout, layer_tensors, merge_cross_layer, planes_of_tensor
from .metadata import LoadSpec, PegaflowMetadata, PegaflowWorkerMeta
from .options import ConnectorOptions
from pegaflow_core.regions import region_for_storage
from .stats import PegaflowStats

log = logging.getLogger("pegaflow.vllm")


@dataclass(frozen=True)
class Ranks:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1


@dataclass
class ActiveLoad:
    spec: LoadSpec
    handle: LoadHandle
    block_ids: list[int]


@dataclass
class StepLoads:
    active: list[ActiveLoad] = field(default_factory=list)
    failed: set[int] = field(default_factory=set)
    leases_done: set[str] = field(default_factory=set)


class PegaflowWorker:
    def __init__(self, vllm_config: Any, options: ConnectorOptions, layout: CacheLayout, model: str,
                 instance_id: str, ranks: Ranks) -> None:
        transfer = vllm_config.kv_transfer_config
        self.options = options
        self.layout = layout
        self.ranks = ranks
        self.model = model
        self.instance_id = instance_id
        self.can_load = bool(transfer.is_kv_consumer)
        self.can_save = bool(transfer.is_kv_producer)
        self.sync_save = options.sync_save if options.sync_save is not None else transfer.kv_role == "kv_producer"
        self.namespace = layout.namespace(model, pp_rank=ranks.pp_rank)
        self.shard = layout.shard_of(ranks.tp_rank)
        self.num_blocks = 0
        self.client = PegaflowClient(options.endpoint, timeout_s=options.timeout_s,
                                     description=f"vllm worker {instance_id} tp{ranks.tp_rank} pp{ranks.pp_rank}")
        self.gate = DaemonGate(options.endpoint, options.retry_interval_s, f"vLLM worker tp{ranks.tp_rank}", log)
        self.stats = PegaflowStats()
        self.handle: ContextHandle | None = None
        self.layer_index: dict[str, int] = {}
        self.on_cuda = False
        self._loads = StepLoads()
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="pegaflow-save")
        self._pending: list[tuple[Future[dict[str, int]], frozenset[str]]] = []
        self._awaiting: set[str] = set()  # finished requests held by vLLM until their saves complete
        self._lock = threading.Lock()

    # -- registration -------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any], num_blocks: int) -> ContextSpec:
        """Describe the KV tensors as regions + planes and register them (lazily: a daemon that is
        down now is registered with as soon as it answers)."""
        tensors = layer_tensors(kv_caches, self.layout)
        if not tensors:
            raise ValueError("register_kv_caches got no KV cache tensors for the transferred group")
        first = tensors[0][1]
        self.on_cuda = first.device.type == "cuda"
        self.num_blocks = num_blocks
        regions, region_of_storage, planes, orders = [], {}, [], set()
        for layer, (name, tensor) in enumerate(tensors):
            storage = tensor.untyped_storage().data_ptr()
            if storage not in region_of_storage:
                region_of_storage[storage] = len(regions)
                regions.append(region_for_storage(tensor, self.options.memory))
            index = region_of_storage[storage]
            described = planes_of_tensor(tensor, self.num_blocks, layer, storage)
            if described.page_bytes != self.layout.page_bytes:
                raise ValueError(
                    f"KV tensor of {name} holds {described.page_bytes} bytes per block, the KV cache config says "
                    f"{self.layout.page_bytes}; refusing to register a layout the scheduler does not expect"
                )
            orders.add(described.page_order)
            shift = regions[index].base_offset
            planes.extend(Plane(p.layer, index, p.offset + shift, p.block_stride, p.block_bytes) for p in described.planes)
        if orders != {self.layout.page_order}:
            log.warning("pegaflow: KV pages are laid out %s but the config implies %s; blocks of this worker will not "
                        "match the scheduler's queries (misses, never wrong data)", sorted(orders), self.layout.page_order)
        merged = merge_cross_layer(planes)
        if len(merged) == 1 and len(planes) > 1:
            planes = list(merged)  # cross-layer cache: one contiguous run per block beats layer-wise waits
        by_ptr = {tensor.data_ptr(): i for i, (_, tensor) in enumerate(tensors)}
        layers_of_plane = {p.layer for p in planes}
        self.layer_index = {
            name: (by_ptr[t.data_ptr()] if by_ptr.get(t.data_ptr()) in layers_of_plane else 0)
            for name, t in kv_caches.items() if t.data_ptr() in by_ptr
        }
        spec = ContextSpec(
            namespace=self.namespace, num_blocks=self.num_blocks, regions=tuple(r.spec for r in regions),
            planes=tuple(planes), instance_id=self.instance_id, shard=self.shard, tp_rank=self.ranks.tp_rank,
            tp_size=self.ranks.tp_size, pp_rank=self.ranks.pp_rank, pp_size=self.ranks.pp_size,
            device=first.device.index if self.on_cuda and first.device.index is not None else -1,
        )
        try:
            self.handle = self.client.register_context(spec)
            self.gate.succeeded()
        except PegaflowError as exc:
            if not _transient(exc):
                raise
            self.gate.failed(exc)
            self.handle = ContextHandle(spec)  # the client registers it on first use
        log.info("pegaflow connector (worker tp%d pp%d): %d layers, %d planes in %d %s region(s), shard %d, namespace %s",
                 self.ranks.tp_rank, self.ranks.pp_rank, len(tensors), len(planes), len(regions),
                 regions[0].spec.kind, self.shard, self.namespace)
        return spec

    # -- loads ----------------------------------------------------------------------------------------
    def start_load(self, meta: PegaflowMetadata) -> None:
        if not meta.loads:
            return
        if self.on_cuda:
            import torch

            torch.cuda.current_stream().synchronize()  # vLLM zeroes new blocks on its stream first
        for spec in meta.loads:
            self._start_one(spec)

    def _start_one(self, spec: LoadSpec) -> None:
        loads = self._loads
        if self.handle is None or not self.gate.open():
            loads.failed.update(spec.block_ids)
            return
        try:
            if (spec.namespace, spec.shard) == (self.namespace, self.shard):
                lease, count, release_after = spec.lease_id, len(spec.block_ids), False
            else:  # another shard or stage: this rank's own blocks of the same hashes
                hit = self.client.query(self.handle, spec.block_hashes, lease_ttl_s=self.options.lease_ttl_s)
                lease, count, release_after = hit.lease_id, min(hit.hit_blocks, len(spec.block_ids)), True
            loads.failed.update(spec.block_ids[count:])
            if count:
                handle = self.client.load(self.handle, lease, spec.block_ids[:count], release_after=release_after)
                loads.active.append(ActiveLoad(spec, handle, spec.block_ids[:count]))
            else:
                loads.leases_done.add(spec.lease_id)
            self.gate.succeeded()
        except PegaflowError as exc:
            self._load_failed(spec, spec.block_ids, exc)

    def _load_failed(self, spec: LoadSpec, block_ids: list[int], exc: Exception) -> None:
        if _transient(exc):
            self.gate.failed(exc)
        else:
            log.warning("pegaflow: load for request %s failed (%s); vLLM recomputes its %d blocks", spec.req_id, exc, len(block_ids))
        self.stats.count(daemon_errors=1)
        self._loads.failed.update(block_ids)
        self._loads.leases_done.add(spec.lease_id)

    def wait_for_layer(self, layer_name: str) -> None:
        """Return once this layer of every load of the step is in place (or has failed)."""
        if not self._loads.active:
            return
        index = self.layer_index.get(layer_name)
        if index is None:
            return
        survivors = []
        for load in self._loads.active:
            try:
                load.handle.wait_layer(index)
                survivors.append(load)
            except PegaflowError as exc:
                self._load_failed(load.spec, load.block_ids, exc)
        self._loads.active = survivors

    def finish_loads(self) -> None:
        """Wait for every load of the step and collect failed blocks and finished leases."""
        loads = self._loads
        for load in loads.active:
            try:
                result = load.handle.wait()
            except PegaflowError as exc:
                self._load_failed(load.spec, load.block_ids, exc)
                continue
            loads.failed.update(result.failed_block_ids)
            loads.leases_done.add(load.spec.lease_id)
            self.stats.count(loaded_blocks=len(load.block_ids) - len(result.failed_block_ids),
                             load_failed_blocks=len(result.failed_block_ids), loaded_bytes=result.bytes)
        loads.active = []

    def take_load_errors(self) -> set[int]:
        failed, self._loads.failed = self._loads.failed, set()
        return failed

    def take_worker_meta(self) -> PegaflowWorkerMeta | None:
        done, self._loads.leases_done = self._loads.leases_done, set()
        return PegaflowWorkerMeta(done) if done else None

    # -- saves ----------------------------------------------------------------------------------------
    def submit_save(self, meta: PegaflowMetadata) -> None:
        """ONE Save RPC for every block the step filled, on the save thread."""
        self.finish_loads()
        if not self.can_save or not meta.save_block_ids or self.handle is None:
            return
        ready = None
        if self.on_cuda:
            import torch

            ready = torch.cuda.Event()
            ready.record()  # the daemon copies on its own streams: let the forward finish first
        block_ids, hashes = list(meta.save_block_ids), list(meta.save_hashes)
        future = self._saver.submit(self._save, block_ids, hashes, ready)
        with self._lock:
            self._pending.append((future, frozenset(meta.save_req_ids)))
        if self.sync_save:
            future.result()

    def _save(self, block_ids: list[int], hashes: list[bytes], ready: Any) -> dict[str, int]:
        """Runs on the save thread; returns counts that the step thread folds into the stats
        (PegaflowStats is a plain dict, updated from one thread only)."""
        if ready is not None:
            ready.synchronize()
        if not self.gate.open():
            return {}
        try:
            result = self.client.save(self.handle, block_ids, hashes)
        except PegaflowError as exc:
            if _transient(exc):
                self.gate.failed(exc)
            else:
                log.warning("pegaflow: save of %d blocks failed: %s", len(block_ids), exc)
            return {"daemon_errors": 1}
        self.gate.succeeded()
        return {"save_blocks": len(block_ids), "stored_blocks": result.stored,
                "present_blocks": result.already_present, "dropped_blocks": result.dropped}

    def drain_saves(self) -> None:
        """Block until every submitted save has copied its blocks."""
        with self._lock:
            pending = list(self._pending)
        for future, _ in pending:
            future.result()
        self._prune()

    def _prune(self) -> set[str]:
        """Drop finished saves; return the request ids that still have a save in flight."""
        with self._lock:
            finished = [(f, f.done()) for f, _ in self._pending]
            done = [f for f, is_done in finished if is_done]
            self._pending = [entry for entry, (_, is_done) in zip(self._pending, finished) if not is_done]
            busy = set().union(*(ids for _, ids in self._pending)) if self._pending else set()
        for future in done:
            self.stats.count(**future.result())
        return busy

    def get_finished(self, meta: PegaflowMetadata | None) -> set[str]:
        """Held requests (vLLM kept their blocks for us) whose saves have all completed."""
        if meta is not None:
            self._awaiting.update(meta.held_req_ids)
        if not self._awaiting:
            return set()
        busy = self._prune()
        done = {req_id for req_id in self._awaiting if req_id not in busy}
        self._awaiting -= done
        return done

    def take_stats(self) -> PegaflowStats | None:
        self._prune()
        return self.stats.take()

    def shutdown(self) -> None:
        try:
            self.drain_saves()
        finally:
            self._saver.shutdown(wait=True)
            self.client.close()


def _transient(exc: Exception) -> bool:
    """Daemon down, restarting or slow (as opposed to a request it refused)."""
    return isinstance(exc, DaemonUnavailable)
