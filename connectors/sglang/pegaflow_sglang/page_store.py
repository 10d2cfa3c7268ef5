"""The pegaflow side of the HiCache storage backend: pages of SGLang's host pool saved to,
found in and loaded from the daemon, with no SGLang import (``store.PegaflowStore`` adapts it to
SGLang's ``HiCacheStorage``; the GPU test drives it with a SGLang-shaped pool).

The host pool is registered with the daemon once; a batch is then one Query (+ one Load) or one
Save RPC and the daemon copies between the pool and its tiers itself. Every public call answers
with misses, never an exception, when the daemon is down, restarting or refuses a request: an
exception or a None out of a v1 call would stop SGLang's prefetch/backup work for the request.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from pegaflow_core.client import ContextHandle, ContextSpec, PegaflowClient
from pegaflow_core.errors import DaemonUnavailable, PegaflowError
from pegaflow_core.gate import DaemonGate

from .naming import Placement, page_hash, valid_prefix
from .options import SglangOptions
from .pages import PageLayout, flat_staging_layout, host_page_layout
from .regions import regions_for

log = logging.getLogger("pegaflow.sglang")


class HostPageStore:
    """Thread-safe: SGLang calls it from its prefetch, prefetch-I/O and backup threads at once."""

    def __init__(self, options: SglangOptions, placement: Placement, mla: bool, instance_id: str = "") -> None:
        self.options = options
        self.placement = placement
        self.mla = mla
        self.shard = placement.shard(mla)
        self.instance_id = options.instance_id or instance_id or f"sglang-{os.getpid()}"
        self.client = PegaflowClient(options.endpoint, timeout_s=options.timeout_s,
                                     description=f"sglang hicache {self.instance_id} tp{placement.tp_rank}")
        self.gate = DaemonGate(options.endpoint, options.retry_interval_s, f"SGLang HiCache tp{placement.tp_rank}", log)
        self.layout: PageLayout | None = None
        self.namespace = ""
        self.handle: ContextHandle | None = None
        self._pool: Any = None
        self._staging: Any = None
        self._staging_handle: ContextHandle | None = None
        self._staging_lock = threading.Lock()

    # -- registration ---------------------------------------------------------------------------
    def attach(self, pool: Any) -> ContextSpec:
        """Describe the host pool as planes and register it (lazily if the daemon is down now:
        the client registers it on first use). Raises ValueError for a pool it cannot serve."""
        layout = host_page_layout(pool, self.mla)
        regions, planes = regions_for([pool.kv_buffer], layout.planes, self.options.memory)
        self.layout, self._pool = layout, pool
        self.namespace = self.placement.namespace(layout.format)
        spec = self._spec(regions, planes, layout.num_pages, self.instance_id)
        self.handle = self._register(spec)
        log.info("pegaflow HiCache backend (tp%d): %s host pool, %d pages of %d bytes in %d plane(s), %s region, "
                 "shard %d, namespace %s", self.placement.tp_rank, pool.layout, layout.num_pages, layout.page_bytes,
                 len(planes), regions[0].kind, self.shard, self.namespace)
        return spec

    def _spec(self, regions: tuple, planes: tuple, num_blocks: int, instance_id: str) -> ContextSpec:
        p = self.placement
        return ContextSpec(namespace=self.namespace, num_blocks=num_blocks, regions=regions, planes=planes,
                           instance_id=instance_id, shard=self.shard, tp_rank=p.tp_rank, tp_size=p.tp_size,
                           pp_rank=p.pp_rank, pp_size=p.pp_size)

    def _register(self, spec: ContextSpec) -> ContextHandle:
        try:
            handle = self.client.register_context(spec)
            self.gate.succeeded()
            return handle
        except DaemonUnavailable as exc:
            self.gate.failed(exc)
            return ContextHandle(spec)  # registered on first use

    # -- zero-copy page calls (SGLang's batch_*_v1) -----------------------------------------------
    def get_pages(self, keys: Sequence[Any], host_indices: Any) -> list[bool]:
        """Load the cached prefix of ``keys`` into the host pool pages at ``host_indices``; one
        bool per key (a prefix of Trues)."""
        results = [False] * len(keys)
        pages = self._pages(keys, host_indices, "get")
        hashes, n = valid_prefix(keys)
        n = next((i for i, page in enumerate(pages[:n]) if page is None), min(n, len(pages)))
        if n == 0 or not self._ready():
            return results
        try:
            hit = self.client.query(self.handle, hashes[:n], lease_ttl_s=self.options.lease_ttl_s)
            if hit.hit_blocks == 0:
                self.gate.succeeded()
                return results
            loaded = self.client.load(self.handle, hit.lease_id, pages[: hit.hit_blocks], release_after=True).wait()
            self.gate.succeeded()
        except PegaflowError as exc:
            self._failed("get", len(keys), exc)
            return results
        failed = set(loaded.failed_block_ids)
        for i in range(hit.hit_blocks):
            if pages[i] in failed:
                break
            results[i] = True
        return results

    def set_pages(self, keys: Sequence[Any], host_indices: Any) -> list[bool]:
        """Save the host pool pages at ``host_indices`` under ``keys``; one bool per key. Pages
        are content-addressed, so a bad key or page fails alone."""
        results = [False] * len(keys)
        pages = self._pages(keys, host_indices, "set")
        chosen, hashes = [], []
        for i, key in enumerate(keys):
            if i >= len(pages) or pages[i] is None:
                continue
            try:
                hashes.append(page_hash(key))
            except ValueError as exc:
                log.warning("pegaflow HiCache set: keys[%d]: %s; page not saved", i, exc)
                continue
            chosen.append(i)
        if not chosen or not self._ready():
            return results
        try:
            saved = self.client.save(self.handle, [pages[i] for i in chosen], hashes)
            self.gate.succeeded()
        except PegaflowError as exc:
            self._failed("set", len(chosen), exc)
            return results
        if saved.dropped:  # the daemon does not say which: report the batch as not stored
            log.warning("pegaflow HiCache set: the daemon dropped %d of %d pages (its tiers are full of pinned "
                        "blocks)", saved.dropped, len(chosen))
            return results
        for i in chosen:
            results[i] = True
        return results

    def count_prefix(self, keys: Sequence[Any]) -> int:
        """How many leading ``keys`` the daemon holds (SGLang's ``batch_exists``)."""
        hashes, n = valid_prefix(keys)
        if n == 0 or not self._ready():
            return 0
        try:
            hit = self.client.query(self.handle, hashes, lease_ttl_s=self.options.lease_ttl_s)
            if hit.lease_id:
                self.client.release([hit.lease_id])
            self.gate.succeeded()
            return hit.hit_blocks
        except PegaflowError as exc:
            self._failed("exists", n, exc)
            return 0

    # -- copying calls (SGLang's key-based get/set, kept for older releases) -------------------
    def get_flat(self, keys: Sequence[Any], targets: Sequence[Any]) -> list[bool]:
        """Copy the cached prefix of ``keys`` into ``targets`` (flat page tensors)."""
        results = [False] * len(keys)
        hashes, n = valid_prefix(keys)
        n = min(n, len(targets))
        for i in range(n):
            if not self._fits(targets[i], "get", i):
                n = i
                break
        if n == 0 or not self._ready() or not self._ensure_staging():
            return results
        import torch

        with self._staging_lock:
            for start in range(0, n, self.options.staging_pages):
                chunk = hashes[start: min(n, start + self.options.staging_pages)]
                try:
                    hit = self.client.query(self._staging_handle, chunk, lease_ttl_s=self.options.lease_ttl_s)
                    if hit.hit_blocks == 0:
                        break
                    loaded = self.client.load(self._staging_handle, hit.lease_id, list(range(hit.hit_blocks)),
                                              release_after=True).wait()
                    self.gate.succeeded()
                except PegaflowError as exc:
                    self._failed("get", len(chunk), exc)
                    break
                failed = set(loaded.failed_block_ids)
                good = next((b for b in range(hit.hit_blocks) if b in failed), hit.hit_blocks)
                for b in range(good):
                    flat = targets[start + b].reshape(-1).view(torch.uint8)
                    flat.copy_(self._staging[b])
                    results[start + b] = True
                if good < len(chunk):
                    break
        return results

    def set_flat(self, keys: Sequence[Any], values: Sequence[Any]) -> list[bool]:
        """Save flat page tensors ``values`` under ``keys``."""
        results = [False] * len(keys)
        if not self._ready() or not self._ensure_staging():
            return results
        import torch

        todo = []
        for i, (key, value) in enumerate(zip(keys, values)):
            try:
                todo.append((i, page_hash(key)))
            except ValueError as exc:
                log.warning("pegaflow HiCache set: keys[%d]: %s; page not saved", i, exc)
                continue
            if not self._fits(value, "set", i):
                todo.pop()
        with self._staging_lock:
            for start in range(0, len(todo), self.options.staging_pages):
                chunk = todo[start: start + self.options.staging_pages]
                for slot, (i, _) in enumerate(chunk):
                    self._staging[slot].copy_(values[i].reshape(-1).contiguous().view(torch.uint8))
                try:
                    saved = self.client.save(self._staging_handle, list(range(len(chunk))), [h for _, h in chunk])
                    self.gate.succeeded()
                except PegaflowError as exc:
                    self._failed("set", len(chunk), exc)
                    break
                if saved.dropped:
                    continue
                for i, _ in chunk:
                    results[i] = True
        return results

    # -- helpers ---------------------------------------------------------------------------------
    def _ready(self) -> bool:
        if self.handle is None:
            log.warning("pegaflow HiCache backend: called before the host pool was registered; answering misses")
            return False
        return self.gate.open()

    def _pages(self, keys: Sequence[Any], host_indices: Any, what: str) -> list[int | None]:
        """Block ids of the pages ``host_indices`` names, one per key: ``None`` for a page that is
        not page-aligned, not contiguous or outside the pool. A length mismatch is logged and
        answers no page at all (SGLang would have mixed up keys and pages)."""
        layout = self.layout
        if layout is None:
            return []
        import torch

        per = layout.tokens_per_page
        indices = torch.as_tensor(host_indices).reshape(-1).to(torch.int64).cpu()
        if indices.numel() != len(keys) * per:
            log.error("pegaflow HiCache %s: %d keys need %d host indices (%d per page), got %d; nothing transferred",
                      what, len(keys), len(keys) * per, per, indices.numel())
            return []
        if not len(keys):
            return []
        rows = indices.view(len(keys), per)
        starts = rows[:, 0]
        ok = (starts % per == 0) & (starts >= 0) & (starts < layout.num_pages * per)
        ok &= (rows == starts[:, None] + torch.arange(per)).all(dim=1)
        pages = (starts // per).tolist()
        bad = (~ok).nonzero().flatten().tolist()
        if bad:
            log.error("pegaflow HiCache %s: host indices of page(s) %s are not whole pages of this pool (%d pages of %d)",
                      what, bad[:8], layout.num_pages, per)
        return [page if good else None for page, good in zip(pages, ok.tolist())]

    def _fits(self, tensor: Any, what: str, i: int) -> bool:
        nbytes = tensor.numel() * tensor.element_size() if hasattr(tensor, "numel") else -1
        if self.layout is not None and nbytes == self.layout.page_bytes:
            return True
        log.error("pegaflow HiCache %s: page %d holds %d bytes, a page of this pool holds %d", what, i, nbytes,
                  self.layout.page_bytes if self.layout else -1)
        return False

    def _ensure_staging(self) -> bool:
        """The bounce buffer of the copying calls, registered on first use as a second context of
        the same namespace (its stored form equals the pool's, so the two share blocks)."""
        if self._staging_handle is not None:
            return True
        if self.layout is None:
            return False
        import torch

        with self._staging_lock:
            if self._staging_handle is None:
                staging = flat_staging_layout(self.layout.format, self.options.staging_pages)
                buffer = torch.zeros((staging.num_pages, staging.page_bytes), dtype=torch.uint8)
                regions, planes = regions_for([buffer], staging.planes, self.options.memory)
                spec = self._spec(regions, planes, staging.num_pages, f"{self.instance_id}/staging")
                self._staging = buffer
                self._staging_handle = self._register(spec)
        return True

    def _failed(self, what: str, pages: int, exc: Exception) -> None:
        if isinstance(exc, DaemonUnavailable):
            self.gate.failed(exc)
        else:
            log.warning("pegaflow HiCache %s of %d pages failed: %s; answering misses", what, pages, exc)

    def close(self) -> None:
        self.client.close()
