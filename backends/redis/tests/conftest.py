"""A real ``redis-server`` on a free loopback port, with its own temp dir and no persistence.

The session server backs the contract and cluster tests; resilience tests start their own with
:func:`make_server` because they stop and restart it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pegaflow_redis.testing import FAST, REDIS_SERVER, RedisServer

from pegaflow_redis import RedisIndex, RedisIndexOptions  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Private servers for tests that stop or restart theirs."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}")
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def make_index() -> Iterator[Callable[..., RedisIndex]]:
    """Build RedisIndexes (fast heartbeats); all are closed afterwards."""
    built: list[RedisIndex] = []

    def make(url: str, **overrides: Any) -> RedisIndex:
        fields: dict[str, Any] = {"url": url, "node": "a", "key_prefix": f"t-{secrets.token_hex(6)}", **FAST}
        fields.update(overrides)
        index = RedisIndex(RedisIndexOptions(**fields))
        built.append(index)
        return index

    yield make
    for index in built:
        index.close()
