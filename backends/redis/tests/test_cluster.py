"""Several daemons (index clients with different node ids) over one Redis."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pegaflow_redis.testing import FAST, NODE_KEYS as KEYS, NODE_LEASE_TTL as LEASE_TTL, node_keys, wait_for

from pegaflow_core.errors import InvalidArgument
from pegaflow_core.index import IndexStats, Location
from pegaflow_core.keys import BlockKey
from pegaflow_redis import NodeInfo, RedisIndex


def keys(count: int, tag: str = "") -> list[BlockKey]:
    return [BlockKey("cluster", f"{tag}{i}-".encode() + os.urandom(8)) for i in range(count)]


@pytest.fixture
def pair(redis_server, make_index) -> tuple[RedisIndex, RedisIndex]:
    prefix = f"pair-{secrets.token_hex(6)}"
    return make_index(redis_server.url, node="a", key_prefix=prefix), make_index(redis_server.url, node="b",
                                                                               key_prefix=prefix)


def test_b_finds_and_leases_blocks_of_a(pair) -> None:
    a, b = pair
    ks = keys(5)
    a.insert([(k, Location("dram", "", 4096, checksum=2**64 - 1 - i)) for i, k in enumerate(ks[:3])])
    a.insert([(ks[3], Location("ssd", "", 4096))])
    # a sees its own blocks as node ""; b sees them as node "a".
    assert a.lookup(ks[:1]) == [(Location("dram", "", 4096, 2**64 - 1),)]
    assert b.lookup(ks) == [(Location("dram", "a", 4096, 2**64 - 1 - i),) for i in range(3)] + [
        (Location("ssd", "a", 4096),), ()]
    lease = b.acquire(ks, ttl_s=30, owner="engine")
    assert lease.keys == tuple(ks[:4])
    assert a.is_pinned(ks) == [True, True, True, True, False]
    assert a.victims("dram", 10) == [], "a must not evict blocks b is loading"
    assert a.victims("dram", 10, node="a") == [], "'a' and '' are the same node for a"
    assert b.victims("dram", 10, node="a") == []
    assert a.stats() == b.stats() == IndexStats(blocks=4, pinned=4, leases=1)
    assert b.release(lease.lease_id) is True
    assert a.victims("dram", 10) == ks[:3]
    # Any daemon can end any lease (an operator tool, say); its holder then learns it is over.
    other = b.acquire(ks[:1], ttl_s=30)
    assert a.release(other.lease_id) is True
    assert b.release(other.lease_id) is False
    assert a.stats() == IndexStats(blocks=4, pinned=0, leases=0)


def test_insert_by_stack_node_name_reads_back_as_this_node(pair) -> None:
    a, b = pair
    key = keys(1)[0]
    a.insert([(key, Location("dram", "a", 8))])  # the tier stack names its own node explicitly
    assert a.lookup([key]) == [(Location("dram", "", 8),)]
    assert a.victims("dram", 1, node="a") == [key]
    assert a.remove([key], node="a") == 1
    assert b.lookup([key]) == [()]


def test_offsets_travel_with_locations_and_older_records_read_without_one(pair) -> None:
    """A record written before locations carried offsets (four fields) still reads: offset -1,
    which makes a fetching peer wait for its Pin's answer."""
    a, b = pair
    new, old = keys(2)
    a.insert([(new, Location("dram", "", 2 << 20, checksum=9, offset=6 << 20))])
    assert b.lookup([new]) == [(Location("dram", "a", 2 << 20, 9, 6 << 20),)]
    a._client.hset(f"{a.options.key_prefix}:loc", old.encode(), b"dram\x1fa\x1f4096\x1f7")
    assert b.lookup([old]) == [(Location("dram", "a", 4096, 7),)]
    assert b.lookup([old])[0][0].offset == -1


def test_same_key_on_two_nodes(pair) -> None:
    a, b = pair
    key = keys(1)[0]
    a.insert([(key, Location("dram", "", 8))])
    b.insert([(key, Location("dram", "", 8))])
    assert set(a.lookup([key])[0]) == {Location("dram", "", 8), Location("dram", "b", 8)}
    assert a.stats().blocks == 1
    assert a.remove([key], node="") == 1  # a evicts its copy; b's stays
    assert b.lookup([key]) == [(Location("dram", "", 8),)]
    assert a.victims("dram", 5, node="b") == [key]


def test_register_node_and_nodes(pair) -> None:
    a, b = pair
    a.register_node("a", "10.0.0.1:7000", {"rdma": b"\x00\xffrkey", "loopback": b"pool-a"})
    b.register_node("b", "10.0.0.2:7000", {})
    assert b.nodes() == {
        "a": NodeInfo("a", "10.0.0.1:7000", {"rdma": b"\x00\xffrkey", "loopback": b"pool-a"}),
        "b": NodeInfo("b", "10.0.0.2:7000", {}),
    }
    a.register_node("a", "10.0.0.1:7001", {"loopback": b"pool-a2"})  # re-registering replaces
    assert b.nodes()["a"] == NodeInfo("a", "10.0.0.1:7001", {"loopback": b"pool-a2"})
    with pytest.raises(InvalidArgument, match="node_id 'x' is not this index's node 'a'"):
        a.register_node("x", "10.0.0.9:1", {})


def test_clean_close_hides_blocks_at_once(pair) -> None:
    a, b = pair
    ks = keys(4)
    a.insert([(k, Location("dram", "", 1)) for k in ks])
    b.insert([(ks[0], Location("dram", "", 1))])
    lease = a.acquire(ks, ttl_s=30)
    assert lease.hits == 4
    a.close()
    assert "a" not in b.nodes()
    assert b.lookup(ks) == [(Location("dram", "", 1),), (), (), ()]
    assert b.stats() == IndexStats(blocks=1, pinned=0, leases=0), "close releases a's leases and its locations"


@pytest.fixture
def crashed_node(redis_server, tmp_path: Path) -> Iterator[Callable[[str, str], subprocess.Popen[str]]]:
    """Start node_process.py as a separate process; the test kills it with SIGKILL."""
    procs: list[subprocess.Popen[str]] = []

    def start(prefix: str, node: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("node_process.py")), redis_server.url, prefix, node],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        procs.append(proc)
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("ready"):
            proc.kill()
            pytest.fail(f"node process {node!r} did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_crashed_node_disappears_within_node_ttl(redis_server, make_index, crashed_node) -> None:
    prefix = f"crash-{secrets.token_hex(6)}"
    # b heartbeats rarely, so it reaps nothing during the test: what hides a's blocks from b is the
    # liveness filter of its own scripts, not cleaning.
    b = make_index(redis_server.url, node="b", key_prefix=prefix, heartbeat=20.0, node_ttl=60.0)
    b_keys = node_keys("b")
    b.insert([(k, Location("dram", "", 4096)) for k in b_keys])
    proc = crashed_node(prefix, "a")
    a_keys = node_keys("a")
    b.insert([(a_keys[0], Location("ssd", "", 4096, checksum=0))])  # b holds a copy of one of them
    assert set(b.lookup(a_keys[:1])[0]) == {Location("dram", "a", 4096, 0), Location("ssd", "", 4096, 0)}
    assert b.nodes()["a"] == NodeInfo("a", "127.0.0.1:11", {"loopback": b"a-pool"})
    assert b.is_pinned(b_keys) == [True] * KEYS, "a leased all of b's blocks"
    assert b.stats() == IndexStats(blocks=2 * KEYS, pinned=KEYS, leases=1)

    proc.kill()
    proc.wait()
    killed = time.monotonic()
    only_b = [(Location("ssd", "", 4096, 0),)] + [()] * (KEYS - 1)
    waited = wait_for(lambda: b.lookup(a_keys) == only_b, 2 * FAST["node_ttl"] + 1, "hiding a's blocks")
    assert waited <= FAST["node_ttl"] + 0.5, f"a's blocks were visible {waited:.2f} s after it died"
    assert "a" not in b.nodes()
    lease = b.acquire(a_keys, ttl_s=5)
    assert lease.keys == (a_keys[0],) and lease.locations == ((Location("ssd", "", 4096, 0),),), \
        "only b's own copy may be leased, never the dead node's"
    b.release(lease.lease_id)
    assert b.stats().blocks == 2 * KEYS, "a's locations are hidden but not reaped yet"
    # Any live node's heartbeat reaps a dead node's locations; a's lease ends on the server by its
    # ttl, so b can evict its blocks again although a never released the lease.
    make_index(redis_server.url, node="c", key_prefix=prefix)
    wait_for(lambda: b.stats().blocks == KEYS + 1, 2.0, "reaping a's locations")
    assert b.lookup(a_keys[:1]) == [(Location("ssd", "", 4096, 0),)], "reaping keeps b's copy"
    wait_for(lambda: b.is_pinned(b_keys) == [False] * KEYS, killed - time.monotonic() + LEASE_TTL + 1.0,
             "a's lease ending by its ttl")
    assert b.victims("dram", KEYS) == b_keys
    assert b.stats() == IndexStats(blocks=KEYS + 1, pinned=0, leases=0)


def test_restarted_node_forgets_what_its_earlier_process_published(redis_server, make_index, crashed_node) -> None:
    prefix = f"reborn-{secrets.token_hex(6)}"
    b = make_index(redis_server.url, node="b", key_prefix=prefix)
    b.insert([(k, Location("dram", "", 4096)) for k in node_keys("b")])
    proc = crashed_node(prefix, "a")
    proc.kill()
    proc.wait()
    # A new process for node a starts at once, before its old heartbeat lapsed: the old process's
    # pool died with it, so what it published must go, and only the new process's inserts count.
    a = make_index(redis_server.url, node="a", key_prefix=prefix)
    fresh = keys(2)
    a.insert([(k, Location("dram", "", 8)) for k in fresh])
    assert b.lookup(node_keys("a")) == [()] * KEYS
    assert b.lookup(fresh) == [(Location("dram", "a", 8),)] * 2
    assert b.stats().blocks == KEYS + 2


def test_concurrent_nodes_and_threads(pair) -> None:
    a, b = pair
    shared = keys(64, "s")
    a.insert([(k, Location("dram", "", 1)) for k in shared[:32]])
    b.insert([(k, Location("dram", "", 1)) for k in shared[32:]])
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def leaser(index: RedisIndex, worker: int) -> None:
        try:
            barrier.wait()
            for i in range(60):
                start = (worker * 11 + i) % 32
                lease = index.acquire(shared[start : start + 16], ttl_s=30, owner=f"w{worker}")
                assert lease.hits == 16
                assert all(index.is_pinned(list(lease.keys)))
                if i % 10 == 9:
                    assert index.release_owner(f"w{worker}") == 1
                else:
                    assert index.release(lease.lease_id) is True
        except BaseException as exc:
            errors.append(exc)

    def churner(index: RedisIndex) -> None:
        try:
            barrier.wait()
            mine = keys(8, "churn")
            for _ in range(40):
                index.insert([(k, Location("ssd", "", 1)) for k in mine])
                assert index.remove(mine, tier="ssd") == 8
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=leaser, args=(index, w)) for w, index in enumerate((a, b, a, b))]
    threads += [threading.Thread(target=churner, args=(index,)) for index in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "index deadlocked under concurrent use"
    if errors:
        raise errors[0]
    assert a.stats() == IndexStats(blocks=64, pinned=0, leases=0)
    assert set(a.victims("dram", 64)) == set(shared[:32])


def test_lease_deadline_is_enforced_by_the_server(pair) -> None:
    a, b = pair
    ks = keys(3)
    a.insert([(k, Location("dram", "", 1)) for k in ks])
    lease = b.acquire(ks, ttl_s=1.0)
    assert a.is_pinned(ks) == [True] * 3
    time.sleep(max(0.0, lease.expires_at + 0.3 - time.monotonic()))
    # Nobody called expire(): the server's deadline alone ends the lease everywhere.
    assert a.is_pinned(ks) == [False] * 3
    assert a.stats() == IndexStats(blocks=3, pinned=0, leases=0)
    assert a.release(lease.lease_id) is False
    assert b.expire() == 1, "b still sweeps its own record of the lease"


def test_keys_of_different_sizes_in_one_call(pair) -> None:
    a, b = pair
    mixed = [BlockKey("m", b"\x01"), BlockKey("model/long-namespace", b"\x02" * 64, 3), BlockKey("m", b"\x03" * 9)]
    a.insert([(k, Location("dram", "", i)) for i, k in enumerate(mixed)])
    assert b.lookup(mixed + [BlockKey("m", b"\x04")]) == [(Location("dram", "a", i),) for i in range(3)] + [()]
    lease = b.acquire(mixed, ttl_s=30)
    assert lease.keys == tuple(mixed) and a.is_pinned(mixed) == [True] * 3
    assert b.release(lease.lease_id) is True
    assert a.victims("dram", 5) == mixed
