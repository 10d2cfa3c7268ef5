"""The index a clustered daemon uses: a local index in front of the cluster index."""

from __future__ import annotations

import uuid

import pytest

from pegaflow_conformance import IndexContract
from pegaflow_core.default_plugins.local_index import LocalIndex
from pegaflow_core.index import Location
from pegaflow_core.keys import BlockKey
from pegaflow_core.node_index import NodeIndex

testing = pytest.importorskip("pegaflow_redis.testing")
if testing.REDIS_SERVER is None:
    pytest.skip("redis-server is not installed (apt-get install redis-server)", allow_module_level=True)
from pegaflow_redis import RedisIndex, RedisIndexOptions  # noqa: E402


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = testing.RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def redis_index(redis, node: str, prefix: str) -> RedisIndex:
    return RedisIndex(RedisIndexOptions(url=redis.url, node=node, key_prefix=prefix, **testing.FAST))


class TestNodeIndex(IndexContract):
    @pytest.fixture
    def index_factory(self, redis):
        made = []

        def factory() -> NodeIndex:
            index = NodeIndex(LocalIndex(), redis_index(redis, "n1", f"c{uuid.uuid4().hex[:8]}"))
            made.append(index)
            return index

        yield factory
        for index in made:
            try:
                index.close()
            except Exception:
                pass


def key(i: int) -> BlockKey:
    return BlockKey("ns", f"k{i}".encode())


def test_a_prefix_spans_local_and_remote_blocks_and_survives_a_redis_outage(redis):
    prefix = f"c{uuid.uuid4().hex[:8]}"
    a = NodeIndex(LocalIndex(), redis_index(redis, "a", prefix))
    b = NodeIndex(LocalIndex(), redis_index(redis, "b", prefix))
    try:
        b.insert([(key(i), Location("dram", "", 10)) for i in range(2)])
        a.insert([(key(i), Location("dram", "", 10)) for i in range(2, 4)])
        lease = b.acquire([key(i) for i in range(4)], 30)
        assert lease.hits == 4  # two here, then two on node a
        assert [loc[0].node for loc in lease.locations] == ["", "", "a", "a"]
        assert b.release(lease.lease_id)
        redis.stop()
        local = b.acquire([key(i) for i in range(4)], 30)  # Redis down: this node's blocks still hit
        assert local.hits == 2
        b.release(local.lease_id)
        b.insert([(key(9), Location("dram", "", 10))])  # and saving keeps working
        assert b.lookup([key(9)])[0][0].tier == "dram"
    finally:
        redis.start()
        a.close()
        b.close()


def test_insert_here_serves_this_node_and_publish_tells_the_cluster(redis):
    prefix = f"c{uuid.uuid4().hex[:8]}"
    a = NodeIndex(LocalIndex(), redis_index(redis, "a", prefix))
    b = NodeIndex(LocalIndex(), redis_index(redis, "b", prefix))
    try:
        entries = [(key(i), Location("dram", "", 10)) for i in range(3)]
        b.insert_here(entries)
        assert b.acquire([key(i) for i in range(3)], 5.0).hits == 3  # b serves them at once
        assert a.lookup([key(0)]) == [()]  # nobody else knows yet
        b.publish(entries)
        assert [loc.node for loc in a.lookup([key(0)])[0]] == ["b"]
    finally:
        a.close()
        b.close()


def test_lookup_here_answers_from_this_node_alone(redis):
    """A save asks whether its blocks are stored here already: a question for the local index,
    never a Redis round trip, and still answered with Redis down."""
    prefix = f"c{uuid.uuid4().hex[:8]}"
    a = NodeIndex(LocalIndex(), redis_index(redis, "a", prefix))
    b = NodeIndex(LocalIndex(), redis_index(redis, "b", prefix))
    try:
        a.insert([(key(i), Location("dram", "a", 10)) for i in range(2)])
        b.insert([(key(2), Location("dram", "b", 10))])
        keys = [key(i) for i in range(3)]
        assert [len(locs) for locs in b.lookup(keys)] == [1, 1, 1]  # a's blocks too, through Redis
        assert [[loc.node for loc in locs] for locs in b.lookup_here(keys)] == [[], [], ["b"]]
        redis.stop()
        assert [[loc.node for loc in locs] for locs in b.lookup_here(keys)] == [[], [], ["b"]]
    finally:
        redis.start()
        a.close()
        b.close()
