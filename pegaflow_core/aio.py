"""asyncio façade over the client, for connectors that live on an event loop (SGLang's
scheduler, vLLM's async engine). Each call runs the synchronous client on a worker thread, so the
two clients share one implementation of retries, reconnects and error mapping."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from .client import ContextHandle, ContextSpec, LoadHandle, LoadResult, PegaflowClient, QueryResult, SaveResult


class AsyncPegaflowClient:
    def __init__(self, endpoint: str = "127.0.0.1:50055", timeout_s: float = 5.0, description: str = "") -> None:
        self.sync = PegaflowClient(endpoint, timeout_s, description)

    async def health(self) -> object:
        return await asyncio.to_thread(self.sync.health)

    async def register_context(self, spec: ContextSpec) -> ContextHandle:
        return await asyncio.to_thread(self.sync.register_context, spec)

    async def unregister_context(self, handle: ContextHandle) -> None:
        await asyncio.to_thread(self.sync.unregister_context, handle)

    async def save(self, handle: ContextHandle, block_ids: Sequence[int], block_hashes: Sequence[bytes]) -> SaveResult:
        return await asyncio.to_thread(self.sync.save, handle, block_ids, block_hashes)

    async def query(self, handle: ContextHandle, block_hashes: Sequence[bytes], lease_ttl_s: float = 0.0,
                    wait_s: float = 0.0) -> QueryResult:
        return await asyncio.to_thread(self.sync.query, handle, block_hashes, lease_ttl_s, wait_s)

    async def load(self, handle: ContextHandle, lease_id: str, block_ids: Sequence[int], release_after: bool = True) -> LoadHandle:
        return await asyncio.to_thread(self.sync.load, handle, lease_id, block_ids, release_after)

    async def wait_layer(self, load: LoadHandle, layer: int) -> None:
        await asyncio.to_thread(load.wait_layer, layer)

    async def wait(self, load: LoadHandle) -> LoadResult:
        return await asyncio.to_thread(load.wait)

    async def release(self, lease_ids: Sequence[str]) -> int:
        return await asyncio.to_thread(self.sync.release, lease_ids)

    async def stats(self) -> object:
        return await asyncio.to_thread(self.sync.stats)

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncPegaflowClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
