"""The pegaflow side of the radix-cache route: SGLang's GPU KV pool registered with the daemon
(CUDA IPC on a GPU, shared memory or cross-memory attach for a CPU pool), then per request one
Query, one Load that completes layer by layer, and one Save. No SGLang import: ``radix.py`` wires
it into SGLang's radix cache, the GPU test drives it with SGLang-shaped CUDA tensors.

Layer-wise loading: SGLang's attention layers call ``layer_transfer_counter.wait_until(layer)``
on the KV pool before reading a layer; ``LayerWaiter`` implements that protocol over the daemon's
per-layer load progress, so layer i computes while later layers are still being copied.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pegaflow_core.client import ContextHandle, ContextSpec, LoadHandle, PegaflowClient
from pegaflow_core.errors import DaemonUnavailable, PegaflowError
from pegaflow_core.gate import DaemonGate

from .naming import Placement, page_hash
from .options import SglangOptions
from .pages import device_page_layout
from .regions import regions_for

log = logging.getLogger("pegaflow.sglang")


@dataclass(frozen=True)
class Hit:
    """A query's answer: ``pages`` leading pages are cached and pinned by ``lease_id``;
    ``loading`` says some of them are still being promoted from a lower tier."""

    pages: int
    lease_id: str = ""
    loading: bool = False


class PendingLoad:
    """A load in flight into device pages ``page_ids``."""

    def __init__(self, handle: LoadHandle, page_ids: list[int]) -> None:
        self.handle = handle
        self.page_ids = page_ids
        self.failed: set[int] | None = None  # None: not finished
        self.error: Exception | None = None

    def wait_layer(self, layer: int) -> None:
        if self.failed is not None:
            return
        try:
            self.handle.wait_layer(layer)
        except PegaflowError as exc:
            self._end(exc)

    def finish(self) -> bool:
        """Wait for the whole load; True when every page arrived."""
        if self.failed is None:
            try:
                self.failed = set(self.handle.wait().failed_block_ids)
            except PegaflowError as exc:
                self._end(exc)
        return not self.failed

    def _end(self, exc: Exception) -> None:
        self.error = exc
        self.failed = set(self.page_ids)


class LayerWaiter:
    """SGLang's layer transfer counter protocol (``wait_until``, ``consumer_index``) over the
    loads in flight: the forward pass waits for layer i of every load before reading layer i."""

    consumer_index = 0  # SGLang checks >= 0 before some waits: loads may always be in flight

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loads: list[PendingLoad] = []

    def add(self, load: PendingLoad) -> None:
        with self._lock:
            self._loads.append(load)

    def wait_until(self, layer: int) -> None:
        with self._lock:
            loads = list(self._loads)
        for load in loads:
            load.wait_layer(layer)

    def take_finished(self) -> list[PendingLoad]:
        """Loads whose every layer has arrived (or that failed), finished and removed."""
        with self._lock:
            done = [load for load in self._loads if load.failed is not None
                    or load.handle.layers_done >= load.handle.num_layers]
            self._loads = [load for load in self._loads if load not in done]
        for load in done:
            load.finish()
        return done

    def drain(self) -> list[PendingLoad]:
        with self._lock:
            loads, self._loads = self._loads, []
        for load in loads:
            load.finish()
        return loads


class DeviceKV:
    """Thread-safe client side of the radix-cache route for one engine rank."""

    def __init__(self, options: SglangOptions, placement: Placement, mla: bool, instance_id: str = "") -> None:
        self.options = options
        self.placement = placement
        self.mla = mla
        self.shard = placement.shard(mla)
        self.instance_id = options.instance_id or instance_id or f"sglang-{os.getpid()}"
        self.client = PegaflowClient(options.endpoint, timeout_s=options.timeout_s,
                                     description=f"sglang radix {self.instance_id} tp{placement.tp_rank}")
        self.gate = DaemonGate(options.endpoint, options.retry_interval_s, f"SGLang radix cache tp{placement.tp_rank}", log)
        self.waiter = LayerWaiter()
        self.handle: ContextHandle | None = None
        self.namespace = ""
        self.page_size = 0
        self.num_pages = 0
        self.on_cuda = False
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="pegaflow-sglang-save")

    def attach(self, k_buffers: Sequence[Any], v_buffers: Sequence[Any] | None, page_size: int) -> ContextSpec:
        """Register the KV pool's per-layer buffers (``[slots, heads, dim]``; MLA: ``v_buffers``
        None). Slot ``s`` lies in page ``s // page_size``."""
        tensors, planes, fmt = device_page_layout(k_buffers, v_buffers, page_size, self.mla)
        slots = {int(t.shape[0]) for t in tensors}
        if len(slots) != 1:
            raise ValueError(f"KV buffers of one pool hold different numbers of slots: {sorted(slots)}")
        self.page_size, self.num_pages = page_size, slots.pop() // page_size
        self.on_cuda = tensors[0].device.type == "cuda"
        regions, planes = regions_for(tensors, planes, self.options.memory)
        self.namespace = self.placement.namespace(fmt)
        p = self.placement
        device = tensors[0].device.index if self.on_cuda and tensors[0].device.index is not None else -1
        spec = ContextSpec(namespace=self.namespace, num_blocks=self.num_pages, regions=regions, planes=planes,
                           instance_id=self.instance_id, shard=self.shard, tp_rank=p.tp_rank, tp_size=p.tp_size,
                           pp_rank=p.pp_rank, pp_size=p.pp_size, device=device)
        try:
            self.handle = self.client.register_context(spec)
            self.gate.succeeded()
        except DaemonUnavailable as exc:
            self.gate.failed(exc)
            self.handle = ContextHandle(spec)  # registered on first use
        log.info("pegaflow radix cache (tp%d): %d layers, %d pages of %d tokens (%d bytes), %d %s region(s), shard %d, "
                 "namespace %s", p.tp_rank, fmt.num_layers, self.num_pages, page_size, fmt.page_bytes, len(regions),
                 regions[0].kind, self.shard, self.namespace)
        return spec

    # -- loads --------------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[str]) -> Hit:
        """How many leading pages of ``keys`` (SGLang page hash strings) the daemon holds; they
        stay pinned until loaded or released. Misses when the daemon is down or refuses."""
        if self.handle is None or not keys or not self.gate.open():
            return Hit(0)
        try:
            hit = self.client.query(self.handle, [page_hash(k) for k in keys], lease_ttl_s=self.options.lease_ttl_s)
            self.gate.succeeded()
        except (PegaflowError, ValueError) as exc:
            self._failed("lookup", exc)
            return Hit(0)
        return Hit(hit.hit_blocks, hit.lease_id, hit.loading)

    def start_load(self, hit: Hit, page_ids: Sequence[int], layerwise: bool = True) -> PendingLoad | None:
        """Copy the hit's first ``len(page_ids)`` pages into device pages ``page_ids``. With
        ``layerwise`` the forward pass waits per layer through ``self.waiter``."""
        if self.handle is None or not hit.lease_id or not page_ids:
            return None
        if self.on_cuda:
            import torch

            torch.cuda.current_stream().synchronize()  # nothing of SGLang's may still write these pages
        try:
            load = PendingLoad(self.client.load(self.handle, hit.lease_id, list(page_ids), release_after=True), list(page_ids))
        except PegaflowError as exc:
            self._failed("load", exc)
            self.release(hit)
            return None
        if layerwise:
            self.waiter.add(load)
        return load

    def release(self, hit: Hit) -> None:
        if hit.lease_id:
            try:
                self.client.release([hit.lease_id])
            except PegaflowError:
                pass  # the lease expires on its own

    # -- saves ----------------------------------------------------------------------------------------
    def save(self, page_ids: Sequence[int], keys: Sequence[str]) -> Future[bool]:
        """Save device pages ``page_ids`` under ``keys`` on the save thread (saves stay in
        order). The pages must not be reused until the future is done; on a GPU the copy starts
        once the work queued so far on the current stream has finished."""
        ready = None
        if self.on_cuda:
            import torch

            ready = torch.cuda.Event()
            ready.record()
        return self._saver.submit(self._save, list(page_ids), list(keys), ready)

    def _save(self, page_ids: list[int], keys: list[str], ready: Any) -> bool:
        if ready is not None:
            ready.synchronize()
        if self.handle is None or not page_ids or not self.gate.open():
            return False
        try:
            result = self.client.save(self.handle, page_ids, [page_hash(k) for k in keys])
            self.gate.succeeded()
        except (PegaflowError, ValueError) as exc:
            self._failed("save", exc)
            return False
        return result.dropped == 0

    def _failed(self, what: str, exc: Exception) -> None:
        if isinstance(exc, DaemonUnavailable):
            self.gate.failed(exc)
        else:
            log.warning("pegaflow radix cache %s failed: %s; serving without the cache for it", what, exc)

    def close(self) -> None:
        self.waiter.drain()
        self._saver.shutdown(wait=True)
        self.client.close()
