"""Entry point of pegaflow-sglang in SGLang's general plugin group (``sglang.srt.plugins``):
registers the radix-cache backend ``pegaflow`` in every SGLang process, so
``--radix-cache-backend pegaflow`` resolves. SGLang loads general plugins early in each process."""

from __future__ import annotations

BACKEND_NAME = "pegaflow"


def register() -> None:
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    from .radix import pegaflow_radix_cache

    if get_radix_cache_factory(BACKEND_NAME) is None:  # plugins may load twice per process
        register_radix_cache_backend(BACKEND_NAME, pegaflow_radix_cache)
