"""The asyncio client: the same calls from an event loop, against a real daemon."""

from __future__ import annotations

import asyncio

from daemon_helpers import SMALL
from pegaflow_core.aio import AsyncPegaflowClient
from pegaflow_core.errors import DaemonUnavailable
from pegaflow_core.host_kv import HostKVCache
from pegaflow_core.sim_engine import block_hashes, block_matches, fill_block


def test_save_query_load_from_an_event_loop(daemon):
    async def main() -> None:
        cache = HostKVCache(SMALL)
        try:
            async with AsyncPegaflowClient(daemon.endpoint) as client:
                assert (await client.health()).status == "serving"
                handle = await client.register_context(cache.context_spec(SMALL.namespace("aio")))
                hashes = block_hashes(list(range(16 * 4)), 16)
                for block_id, h in enumerate(hashes):
                    fill_block(cache, block_id, h)
                saved, _ = await asyncio.gather(client.save(handle, [0, 1, 2, 3], hashes), client.stats())
                assert saved.stored == 4
                hit = await client.query(handle, hashes)
                load = await client.load(handle, hit.lease_id, [10, 11, 12, 13])
                await client.wait_layer(load, 0)
                result = await client.wait(load)
                assert result.failed_block_ids == ()
                assert all(block_matches(cache, 10 + i, h) for i, h in enumerate(hashes))
        finally:
            cache.close()

    asyncio.run(main())


def test_unreachable_daemon_raises_daemon_unavailable_quickly():
    async def main() -> None:
        async with AsyncPegaflowClient("127.0.0.1:1", timeout_s=0.5) as client:
            try:
                await client.health()
            except DaemonUnavailable as exc:
                assert "unavailable" in str(exc)
            else:
                raise AssertionError("no error from a daemon that is not there")

    asyncio.run(asyncio.wait_for(main(), 10))
