"""``PegaflowStore``: SGLang's HiCache storage backend (L3 under the host pool) on the machine's
pegaflow daemon. Loaded by SGLang's dynamic backend loader:

    --enable-hierarchical-cache --hicache-mem-layout page_first \\
    --hicache-storage-backend dynamic \\
    --hicache-storage-backend-extra-config '{"backend_name":"pegaflow","module_path":"pegaflow_sglang",
        "class_name":"PegaflowStore","interface_v1":1,"endpoint":"127.0.0.1:50055"}'

SGLang builds it as ``PegaflowStore(storage_config, kwargs)`` and hands it the host pool later
(``register_mem_pool_host``). ``interface_v1`` selects the zero-copy calls (``batch_get_v1`` /
``batch_set_v1``); without it SGLang uses the key-based copying calls, which work too.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage

from .naming import Placement
from .options import SglangOptions
from .page_store import HostPageStore

log = logging.getLogger("pegaflow.sglang")


def placement_of(storage_config: Any, model: str) -> Placement:
    """The rank's place from SGLang's HiCacheStorageConfig (fields missing from older releases
    default to a single rank)."""
    return Placement(
        model=model, tp_rank=int(storage_config.tp_rank), tp_size=int(storage_config.tp_size),
        pp_rank=int(getattr(storage_config, "pp_rank", 0) or 0), pp_size=int(getattr(storage_config, "pp_size", 1) or 1),
        cp_rank=int(getattr(storage_config, "attn_cp_rank", 0) or 0),
        cp_size=int(getattr(storage_config, "attn_cp_size", 1) or 1),
    )


class PegaflowStore(HiCacheStorage):
    """Thread-safe (SGLang calls it from four threads). The v1 calls and ``batch_exists`` never
    raise and never return None: a daemon that is down or refuses a request means misses."""

    def __init__(self, storage_config: Any, kwargs: Any = None) -> None:
        extra = getattr(storage_config, "extra_config", None) or {}
        self.options = SglangOptions.from_mapping(extra, "--hicache-storage-backend-extra-config")
        model = self.options.model or getattr(storage_config, "model_name", None) or ""
        if not model:
            raise ValueError(
                "pegaflow HiCache backend: SGLang gave no model name; add \"model\": \"<name>\" to "
                "--hicache-storage-backend-extra-config so blocks of different models never mix"
            )
        if int(getattr(storage_config, "dcp_size", 1) or 1) > 1:
            raise ValueError("pegaflow HiCache backend: decode context parallelism (dcp_size > 1) is not supported")
        if getattr(storage_config, "should_split_heads", False):
            raise ValueError("pegaflow HiCache backend: split-head storage (tp_lcm_size) is not supported")
        self.storage_config = storage_config
        self.is_mla = bool(storage_config.is_mla_model)
        self.pages = HostPageStore(self.options, placement_of(storage_config, model), self.is_mla)
        self.mem_pool_host = None

    # -- pool registration ---------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Register the host pool with the daemon once (a pool pegaflow cannot address fails
        the attach with the reason)."""
        super().register_mem_pool_host(mem_pool_host)
        self.pages.attach(mem_pool_host)

    # -- zero-copy interface ---------------------------------------------------------------------
    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        return self._guard("batch_get_v1", keys, lambda: self.pages.get_pages(keys, host_indices))

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        return self._guard("batch_set_v1", keys, lambda: self.pages.set_pages(keys, host_indices))

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        try:
            return self.pages.count_prefix(list(keys))
        except Exception:
            log.exception("pegaflow HiCache batch_exists failed; answering 0")
            return 0

    # -- key-based interface (copies; what older releases call) --------------------------------
    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        if target_location is None:
            log.error("pegaflow HiCache get(%r): no target_location; pegaflow loads into a given page tensor", key)
            return None
        return target_location if self.batch_get([key], [target_location])[0] is not None else None

    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None) -> list[torch.Tensor | None]:
        targets = list(target_locations or [])
        if len(targets) != len(keys):
            log.error("pegaflow HiCache batch_get: %d keys but %d target locations", len(keys), len(targets))
            return [None] * len(keys)
        found = self._guard("batch_get", keys, lambda: self.pages.get_flat(keys, targets))
        return [t if ok else None for t, ok in zip(targets, found)]

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None) -> bool:
        values = list(values or [])
        if len(values) != len(keys) or any(v is None for v in values):
            log.error("pegaflow HiCache batch_set: %d keys but %d values", len(keys), len(values))
            return False
        return all(self._guard("batch_set", keys, lambda: self.pages.set_flat(keys, values)))

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # -- admin ------------------------------------------------------------------------------------
    def clear(self) -> None:
        """pegaflow's blocks are shared by every engine on the machine: this engine does not
        delete them (restart the daemon, or let eviction age them out)."""
        log.info("pegaflow HiCache clear: blocks are shared with other engines and are left in the daemon")

    def get_stats(self) -> Any:
        return None

    def close(self) -> None:
        self.pages.close()

    def _guard(self, what: str, keys: list[str], call: Any) -> list[bool]:
        """Run a page call; an unexpected error becomes misses (logged), never an exception."""
        try:
            result = call()
        except Exception:
            log.exception("pegaflow HiCache %s of %d pages failed; answering misses", what, len(keys))
            return [False] * len(keys)
        return result
