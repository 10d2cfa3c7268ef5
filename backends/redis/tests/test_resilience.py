"""Redis unreachable, restarted empty, or cut off for a while: the index fails fast with a clear
error where it must, keeps the daemon serving alone where it can, and republishes when Redis is
back."""

from __future__ import annotations

import os
import secrets
import signal
import time

import pytest
from pegaflow_redis.testing import CuttableProxy, free_port, wait_for

from pegaflow_core.errors import TransportError
from pegaflow_core.index import IndexStats, Location
from pegaflow_core.keys import BlockKey
from pegaflow_redis import NodeInfo, RedisIndex, RedisIndexOptions


def keys(count: int) -> list[BlockKey]:
    return [BlockKey("resilience", i.to_bytes(2, "little") + os.urandom(8)) for i in range(count)]


def timed(call):  # type: ignore[no-untyped-def]
    start = time.monotonic()
    try:
        return call(), time.monotonic() - start
    except TransportError as exc:
        return exc, time.monotonic() - start


def test_unreachable_server_fails_fast_at_start() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    start = time.monotonic()
    with pytest.raises(TransportError, match=rf"redis index {url} \(node 'a'\): heartbeat failed: ConnectionError"):
        RedisIndex(RedisIndexOptions(url=url, node="a", socket_timeout=0.5))
    assert time.monotonic() - start < 2.0


def test_password_is_not_shown_in_errors() -> None:
    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
    with pytest.raises(TransportError) as caught:
        RedisIndex(RedisIndexOptions(url=url, node="a", socket_timeout=0.5))
    assert "s3cret" not in str(caught.value) and "user:***@127.0.0.1" in str(caught.value)


def test_redis_down_then_restarted_empty(make_server, make_index) -> None:
    server = make_server()
    prefix = f"down-{secrets.token_hex(6)}"
    a = make_index(server.url, node="a", key_prefix=prefix)
    a.register_node("a", "10.0.0.1:7000", {"rdma": b"rkey-a"})
    ks = keys(6)
    a.insert([(k, Location("dram", "", 4096, checksum=i)) for i, k in enumerate(ks[:4])])
    a.insert([(ks[0], Location("ssd", "", 4096, checksum=0))])
    held = a.acquire(ks[:2], ttl_s=30, owner="engine")
    assert held.hits == 2

    server.stop()
    # Reads the daemon can do without: misses, quickly.
    got, took = timed(lambda: a.lookup(ks))
    assert got == [()] * 6 and took < 1.5
    lease, took = timed(lambda: a.acquire(ks, ttl_s=30, owner="engine"))
    assert lease.hits == 0 and took < 1.5
    assert a.release(lease.lease_id) is True, "a miss handed out during the outage is still a valid lease"
    # Writes of this node's own blocks: kept in the shadow, published when Redis is back.
    a.insert([(ks[4], Location("dram", "", 4096, checksum=4))])
    assert a.remove([ks[1]], tier="dram") == 0, "nothing is known to have been removed while Redis is down"
    assert a.release(held.lease_id) is True
    # Calls that cannot be answered alone: a clear error naming the server, quickly.
    for call in (lambda: a.victims("dram", 4), lambda: a.is_pinned(ks), a.stats, a.nodes):
        error, took = timed(call)
        assert isinstance(error, TransportError), f"expected TransportError, got {error!r}"
        assert server.url in str(error) and "(node 'a')" in str(error)
        assert took < 1.5, f"{error} took {took:.2f} s"

    server.start()  # same port, no data: everything the cluster knew is gone
    b = make_index(server.url, node="b", key_prefix=prefix)
    wait_for(lambda: b.lookup(ks[:1]) != [()], 3.0, "a republishing after the restart")
    assert [set(locs) for locs in b.lookup(ks)] == [
        {Location("dram", "a", 4096, 0), Location("ssd", "a", 4096, 0)},
        set(),  # removed during the outage
        {Location("dram", "a", 4096, 2)},
        {Location("dram", "a", 4096, 3)},
        {Location("dram", "a", 4096, 4)},  # inserted during the outage
        set(),
    ]
    assert b.nodes()["a"] == NodeInfo("a", "10.0.0.1:7000", {"rdma": b"rkey-a"})
    # Republished in the order a inserted them (ks[0] last went to ssd, after ks[1..3]).
    assert a.victims("dram", 10) == [ks[2], ks[3], ks[0], ks[4]]
    assert a.stats() == IndexStats(blocks=4, pinned=0, leases=0)


def test_outage_with_data_kept_is_reconciled(redis_server, make_index) -> None:
    """A partition, not a restart: Redis keeps what a published before, and a's heartbeat does not
    lapse. What a removed meanwhile must still disappear, what it inserted must appear."""
    proxy = CuttableProxy(redis_server.port)
    try:
        prefix = f"cut-{secrets.token_hex(6)}"
        a = make_index(proxy.url, node="a", key_prefix=prefix, heartbeat=0.1, node_ttl=5.0)
        b = make_index(redis_server.url, node="b", key_prefix=prefix)
        ks = keys(4)
        a.insert([(k, Location("dram", "", 1)) for k in ks[:3]])
        proxy.cut()
        assert a.remove([ks[0]]) == 0
        a.insert([(ks[3], Location("dram", "", 1))])
        assert a.lookup(ks) == [()] * 4
        assert b.lookup(ks) == [(Location("dram", "a", 1),)] * 3 + [()], "b still sees a's old blocks"
        proxy.restore()
        wait_for(lambda: b.lookup(ks) == [(), (Location("dram", "a", 1),), (Location("dram", "a", 1),),
                                          (Location("dram", "a", 1),)], 3.0, "reconciling a's blocks")
        assert b.stats().blocks == 3
    finally:
        proxy.close()


def test_dead_connections_after_a_restart_are_replaced(make_server, make_index) -> None:
    """A pooled connection to the old server process fails on first use; the index retries once on
    a new connection instead of reporting an outage that is over."""
    server = make_server()
    a = make_index(server.url, heartbeat=30.0, node_ttl=60.0)  # no heartbeat during the test
    ks = keys(2)
    a.insert([(ks[0], Location("dram", "", 1))])
    server.stop()
    server.start()
    assert a.stats() == IndexStats(0, 0, 0), "the restarted server is empty"
    a.insert([(ks[1], Location("dram", "", 1))])
    assert a.lookup(ks) == [(), (Location("dram", "", 1),)]


def test_hung_server_times_out(make_server, make_index) -> None:
    """A server that accepts but never answers (stopped, swapping, partitioned mid-stream) costs at
    most socket_timeout per attempt, never a hang."""
    server = make_server()
    a = make_index(server.url, socket_timeout=0.3, heartbeat=30.0, node_ttl=60.0)
    ks = keys(2)
    a.insert([(k, Location("dram", "", 1)) for k in ks])
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        got, took = timed(lambda: a.lookup(ks))
        assert got == [(), ()] and took < 1.5, f"lookup took {took:.2f} s"
        error, took = timed(lambda: a.victims("dram", 2))
        assert isinstance(error, TransportError) and "TimeoutError" in str(error) and took < 1.5
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert a.lookup(ks) == [(Location("dram", "", 1),)] * 2, "the index recovers once the server answers"
