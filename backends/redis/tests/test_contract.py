"""The shared Index contract, run against RedisIndex on a real redis-server."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import pytest
from pegaflow_conformance import IndexContract

from pegaflow_redis import RedisIndex, RedisIndexOptions


class TestRedisIndex(IndexContract):
    @pytest.fixture
    def index_factory(self, redis_server) -> Callable[[], RedisIndex]:
        def factory() -> RedisIndex:
            return RedisIndex(RedisIndexOptions(url=redis_server.url, node="contract",
                                                key_prefix=f"contract-{secrets.token_hex(6)}"))

        return factory
