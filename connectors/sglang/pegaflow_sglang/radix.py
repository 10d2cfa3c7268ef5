"""``--radix-cache-backend pegaflow``: SGLang's radix cache with the machine's pegaflow daemon
behind the GPU KV pool (the GPU-direct route; the HiCache route goes through the host pool).

It follows SGLang's two-phase contract for external caches (``match_prefix`` reports a
``host_hit_length``; ``init_load_back`` allocates device slots and starts the load):

- match_prefix: after the tree's own match, one Query for the request's remaining pages (their
  SGLang storage hashes, which carry the request's extra key and cache salt); the hit stays
  pinned by a lease until init_load_back loads it or the request goes away.
- init_load_back: allocate the pages, start ONE Load into them and put them in the tree. In
  ``layerwise`` mode (default) the forward pass waits per layer (``LayerWaiter`` registered on
  the KV pool); in ``sync`` mode the load completes first and a failed one is recomputed.
- checkpoint: the request's newly completed pages go to the daemon in ONE Save, on a background
  thread after the forward's work is done; their tree node stays locked until the save is done.

SGLang calls ``check_hicache_events`` only with its own hierarchical caches, so finished saves
and loads are collected at the calls it always makes (match_prefix, checkpoint, evict).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult, InitLoadBackParams, MatchPrefixParams, MatchResult
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode
from sglang.srt.mem_cache.utils import get_storage_hash_str

from .device_kv import DeviceKV, Hit, PendingLoad

log = logging.getLogger("pegaflow.sglang")


@dataclass
class _Planned:
    """A hit reported by match_prefix, waiting for init_load_back."""

    key: RadixKey  # snapshot of the page-aligned key (the live one grows with the request)
    device_len: int  # tokens already on the device when the hit was found
    hit: Hit


def page_keys(key: RadixKey, page_size: int) -> list[str]:
    """SGLang's storage hashes of the key's full pages (chained, seeded by extra key and salt); a
    trailing partial page has no key (SGLang's hash would cover it too)."""
    key = key.page_aligned(page_size)
    if len(key) < page_size:
        return []
    hashes = get_storage_hash_str(key, None, page_size=page_size)
    return [hashes] if isinstance(hashes, str) else list(hashes)


class PegaflowRadixCache(RadixCache):
    def __init__(self, params: Any, kv: DeviceKV, layerwise: bool = True) -> None:
        self.kv = kv
        self.layerwise = layerwise
        self._planned: dict[Any, _Planned] = {}
        self._loads: list[tuple[PendingLoad, TreeNode]] = []
        self._saves: list[tuple[Future[bool], TreeNode]] = []
        self._saved_pages: dict[str, int] = {}
        super().__init__(params)
        kvcache = self.token_to_kv_pool_allocator.get_kvcache()
        mla_buffers = getattr(kvcache, "kv_buffer", None) if kv.mla else None
        if kv.mla:
            kv.attach(mla_buffers, None, self.page_size)
        else:
            kv.attach(kvcache.k_buffer, kvcache.v_buffer, self.page_size)
        if layerwise:
            kvcache.register_layer_transfer_counter(kv.waiter)

    # -- lookups ----------------------------------------------------------------------------------
    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        self._collect()
        base = super().match_prefix(params)
        req = params.req
        if self.disable or req is None or self.is_eagle:
            return base
        handle = req.cache_request_handle
        self._forget(handle)
        key = params.key.page_aligned(self.page_size)
        first = base.device_prefix_len // self.page_size
        if first >= len(key) // self.page_size:
            return base
        keys = page_keys(key, self.page_size)
        hit = self.kv.lookup(keys[first:])
        if hit.pages == 0:
            return base
        snapshot = RadixKey(list(key.raw_token_ids()[: len(key)]), key.extra_key, key.is_bigram, cache_salt=key.cache_salt)
        self._planned[handle] = _Planned(snapshot, base.device_prefix_len, hit)
        node = base.last_device_node
        return base._replace(last_host_node=node, best_match_node=node, host_hit_length=hit.pages * self.page_size)

    def init_load_back(self, params: InitLoadBackParams) -> tuple[int, Any]:
        node = params.best_match_node
        planned = self._planned.pop(params.req.cache_request_handle, None) if params.req is not None else None
        if planned is None:
            return 0, node
        tokens = min(params.host_hit_length, planned.hit.pages * self.page_size)
        tokens -= tokens % self.page_size
        allocator = self.token_to_kv_pool_allocator
        if tokens <= 0:
            self.kv.release(planned.hit)
            return 0, node
        if allocator.available_size() < tokens:
            self.evict(EvictParams(num_tokens=tokens))
        slots = allocator.alloc(tokens)
        if slots is None:
            self.kv.release(planned.hit)
            return 0, node
        pages = (slots[:: self.page_size] // self.page_size).tolist()
        sync = not self.layerwise or planned.hit.loading
        load = self.kv.start_load(planned.hit, pages, layerwise=not sync)
        if load is None or (sync and not load.finish()):
            allocator.free(slots)
            return 0, node
        new = TreeNode(priority=node.priority)
        new.key = planned.key[planned.device_len: planned.device_len + tokens]
        new.value = slots
        new.parent = node
        node.children[new.key.child_key(self.page_size)] = new
        self.evictable_size_ += tokens
        self._update_leaf_status(node)
        self._update_leaf_status(new)
        if not sync:
            self._loads.append((load, new))
        return tokens, new

    def _forget(self, handle: Any) -> None:
        planned = self._planned.pop(handle, None)
        if planned is not None:
            self.kv.release(planned.hit)

    # -- saves --------------------------------------------------------------------------------------
    def checkpoint(self, req: Any, *, up_to: int, **kwargs: Any) -> None:
        super().checkpoint(req, up_to=up_to, **kwargs)
        self._collect()
        if self.disable:
            return
        node = req.last_node
        slots = self.path_device_indices(node)
        pages = len(slots) // self.page_size
        done = self._saved_pages.get(req.rid, 0)
        if pages <= done:
            return
        tokens = req.full_untruncated_fill_ids[: pages * self.page_size]
        keys = page_keys(RadixKey(list(tokens), req.extra_key, cache_salt=getattr(req, "cache_salt", None)), self.page_size)
        page_ids = (slots[done * self.page_size: pages * self.page_size: self.page_size] // self.page_size).tolist()
        self.inc_lock_ref(node)
        self._saves.append((self.kv.save(page_ids, keys[done:pages]), node))
        self._saved_pages[req.rid] = pages

    def on_release(self, req: Any, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        self._saved_pages.pop(req.rid, None)
        self._forget(req.cache_request_handle)

    def release_aborted_request(self, handle: Any) -> None:
        super().release_aborted_request(handle)
        self._forget(handle)

    # -- bookkeeping --------------------------------------------------------------------------------
    def _collect(self) -> None:
        """Unlock nodes whose saves finished; retire finished layer-wise loads."""
        still = []
        for future, node in self._saves:
            if future.done():
                self.dec_lock_ref(node)
            else:
                still.append((future, node))
        self._saves = still
        finished = set(map(id, self.kv.waiter.take_finished()))
        keep = []
        for load, node in self._loads:
            if id(load) not in finished:
                keep.append((load, node))
            elif load.failed:
                log.error("pegaflow radix cache: %d of %d pages failed to load after the request was admitted (%s); "
                          "the pages leave the tree so no later request reuses them", len(load.failed),
                          len(load.page_ids), load.error)
                self._drop(node)
        self._loads = keep

    def _drop(self, node: TreeNode) -> None:
        if node.lock_ref == 0 and not node.children and node.parent is not None:
            self.token_to_kv_pool_allocator.free(node.value)
            self.evictable_size_ -= len(node.key)
            self._delete_leaf(node)

    def check_hicache_events(self) -> None:
        self._collect()

    def has_pending_cache_operations(self) -> bool:
        return bool(self._saves or self._loads)

    def evict(self, params: EvictParams) -> EvictResult:
        self._collect()
        return super().evict(params)

    def reset(self) -> None:
        if hasattr(self, "kv"):
            for handle in list(self._planned):
                self._forget(handle)
            for future, _ in self._saves:
                future.result()
            self._saves, self._loads = [], []
            self.kv.waiter.drain()
            self._saved_pages.clear()
        super().reset()

    def shutdown(self) -> None:
        self.kv.close()


def pegaflow_radix_cache(ctx: Any) -> PegaflowRadixCache:
    """The factory registered as ``pegaflow`` (``--radix-cache-backend pegaflow``)."""
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    from .naming import Placement
    from .options import SglangOptions

    if ctx.enable_hierarchical_cache:
        raise ValueError("--radix-cache-backend pegaflow replaces HiCache: drop --enable-hierarchical-cache, or use "
                         "pegaflow as the HiCache storage backend instead (docs/sglang.md)")
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm:
        raise NotImplementedError("--radix-cache-backend pegaflow supports full-attention models (no SWA/mamba state)")
    options = SglangOptions.from_env()
    server_args = ctx.server_args
    model = options.model or getattr(server_args, "served_model_name", None) or ctx.model_config.model_path
    params = ctx.params
    placement = Placement(model=str(model), tp_rank=ctx.tp_rank, tp_size=ctx.tp_size,
                          pp_rank=getattr(params, "pp_rank", 0), pp_size=getattr(params, "pp_size", 1),
                          cp_rank=getattr(params, "attn_cp_rank", 0), cp_size=getattr(params, "attn_cp_size", 1))
    kvcache = params.token_to_kv_pool_allocator.get_kvcache()
    kv = DeviceKV(options, placement, mla=isinstance(kvcache, MLATokenToKVPool))
    return PegaflowRadixCache(params, kv, layerwise=options.load_mode == "layerwise")
