"""Real SGLang pools and storage configs on CPU for the connector tests. SGLang is imported only
inside functions, so a venv without it skips the tests (with a reason) instead of failing to
collect them."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

PAGE = 4
LAYERS = 3
HEADS = 2
HEAD_DIM = 8
KV_LORA, ROPE = 16, 8
DEVICE_TOKENS = 64
DAEMON_CONFIG = "index: {kind: local}\ntiers: [{kind: dram, capacity: 32mb, chunk: 1mb}]\n"
HOST_LAYOUTS = ("layer_first", "page_first", "page_first_direct")


def need_sglang() -> None:
    pytest.importorskip("sglang", reason="SGLang is not installed here: run connectors/sglang/setup-test-env.sh")
    warnings.filterwarnings("ignore", message="Only CUDA")


def device_pool(mla: bool = False, dtype: Any = None, layers: int = LAYERS) -> Any:
    """SGLang's GPU KV pool class, allocated on the CPU."""
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

    if mla:
        return MLATokenToKVPool(size=DEVICE_TOKENS, page_size=PAGE, dtype=dtype or torch.bfloat16, kv_lora_rank=KV_LORA,
                                qk_rope_head_dim=ROPE, layer_num=layers, device="cpu", enable_memory_saver=False)
    return MHATokenToKVPool(size=DEVICE_TOKENS, page_size=PAGE, dtype=dtype or torch.float16, head_num=HEADS,
                            head_dim=HEAD_DIM, layer_num=layers, device="cpu", enable_memory_saver=False,
                            enable_alt_stream=False)


def host_pool(layout: str, mla: bool = False, dev: Any = None) -> Any:
    """SGLang's HiCache host pool class (MHATokenToKVPoolHost / MLATokenToKVPoolHost) over a
    CPU device pool, as SGLang's pool assembler builds it."""
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    dev = dev or device_pool(mla)
    info = dev.get_device_pool_infos()[0].buffer_info
    common = dict(host_to_device_ratio=2.0, host_size=0, page_size=PAGE, layout=layout, pin_memory=False,
                  device="cpu", device_capacity_tokens=DEVICE_TOKENS, start_layer=0, end_layer=dev.layer_num)
    if mla:
        return MLATokenToKVPoolHost(info, target_layer_num=dev.layer_num, override_kv_cache_dim=dev.kv_cache_dim, **common)
    return MHATokenToKVPoolHost(info, **common)


def storage_config(endpoint: str, mla: bool = False, layout: str = "page_first", tp_rank: int = 0, tp_size: int = 1,
                   model: str = "tiny-model", **extra: Any) -> Any:
    """SGLang's HiCacheStorageConfig as the cache controller builds it for a dynamic backend."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=mla,
        enable_storage_metrics=False, is_page_first_layout=layout == "page_first", model_name=model,
        extra_config={"backend_name": "pegaflow", "module_path": "pegaflow_sglang", "class_name": "PegaflowStore",
                      "interface_v1": 1, "endpoint": endpoint, "timeout_s": 2, "retry_interval_s": 0.2, **extra},
    )


def make_store(endpoint: str, pool: Any, mla: bool = False, **kwargs: Any) -> Any:
    """A PegaflowStore built by SGLang's own dynamic backend loader, with the pool registered as
    the cache controller does it."""
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    config = storage_config(endpoint, mla=mla, layout=pool.layout, **kwargs)
    store = StorageBackendFactory.create_backend("dynamic", config, pool)
    store.register_mem_pool_host(pool)
    return store


def fill_pages(pool: Any, pages: list[int], seed: int) -> None:
    """Random bytes into whole host pages (through SGLang's own page accessors)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for page in pages:
        flat = pool.get_dummy_flat_data_page()
        raw = torch.randint(0, 256, (flat.numel() * flat.element_size(),), generator=gen, dtype=torch.uint8)
        pool.set_from_flat_data_page(page * PAGE, raw.view(flat.dtype))


def page_bytes(pool: Any, pages: list[int]) -> list[bytes]:
    import torch

    return [pool.get_data_page(p * PAGE, flat=True).contiguous().view(torch.uint8).numpy().tobytes() for p in pages]


def indices(pages: list[int]) -> Any:
    """Host indices of whole pages, as SGLang passes them to batch_*_v1."""
    import torch

    return torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE, dtype=torch.int64) for p in pages]) if pages else torch.empty(0, dtype=torch.int64)


def keys(n: int, tag: str = "") -> list[str]:
    """Chained hex page keys like SGLang's (SHA-256 of the previous key and the page's tokens)."""
    import hashlib

    out, prev = [], tag.encode()
    for i in range(n):
        prev = hashlib.sha256(prev + i.to_bytes(4, "little")).digest()
        out.append(prev.hex())
    return out
