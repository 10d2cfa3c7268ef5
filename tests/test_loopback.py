"""Unit tests of the built-in LoopbackTransport: one-sided reads/writes over TCP on 127.0.0.1."""

from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np
import pytest

from pegaflow_core.default_plugins import loopback
from pegaflow_core.default_plugins.loopback import LoopbackOptions, LoopbackTransport
from pegaflow_core.errors import ClosedError, InvalidArgument, NotFound, TransportError
from pegaflow_core.plugins import get_registry
from pegaflow_core.transport import Region, RemoteRegion, TransferOp


@pytest.fixture
def pair():
    a, b = LoopbackTransport(), LoopbackTransport()
    yield a, b
    a.close()
    b.close()


def pattern(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def remote_of(endpoint: LoopbackTransport, region: Region) -> RemoteRegion:
    return RemoteRegion(endpoint.address, region.descriptor)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_registered_as_builtin_plugin():
    assert get_registry(reload=True).get("transport", "loopback") is LoopbackTransport
    assert LoopbackTransport.conformance_options(None) == LoopbackOptions()


def test_address_is_tcp_on_loopback(pair):
    a, b = pair
    assert a.address.startswith("tcp://127.0.0.1:") and a.address != b.address
    assert int(a.address.rsplit(":", 1)[1]) > 0


def test_batched_read_and_write_round_trip_bytes_exactly(pair):
    a, b = pair
    block = 4096
    remote_mem = pattern(64 * block, seed=1)
    local_mem = np.zeros(64 * block, dtype=np.uint8)
    remote = remote_of(b, b.register(remote_mem))
    local = a.register(local_mem)
    # Scattered, reversed placement: local block i <- remote block 63 - i.
    ops = [TransferOp(local, i * block, remote, (63 - i) * block, block) for i in range(64)]
    assert a.read(ops, timeout_s=5).result(timeout=5) is None
    assert np.array_equal(local_mem.reshape(64, block), remote_mem.reshape(64, block)[::-1])

    local_mem[:] = pattern(64 * block, seed=2)
    a.write(ops[:10], timeout_s=5).result(timeout=5)
    assert np.array_equal(remote_mem[54 * block :].reshape(10, block)[::-1], local_mem[: 10 * block].reshape(10, block))


def test_partial_and_unaligned_ranges(pair):
    a, b = pair
    src = bytearray(b"0123456789abcdef" * 4)
    dst = bytearray(64)
    remote = remote_of(b, b.register(src))
    local = a.register(dst)
    a.read([TransferOp(local, 3, remote, 17, 5), TransferOp(local, 40, remote, 0, 0)]).result(timeout=5)
    assert dst[3:8] == src[17:22] and dst.count(0) == 59


def test_large_batches_are_pipelined_in_windows(pair):
    """More ops than the pipeline window, tiny ones (ack-heavy) and big ones."""
    a, b = pair
    count = 3 * loopback._CHUNK + 17
    remote_mem = bytearray(count * 16)
    local_mem = bytearray(pattern(count * 16, seed=3).tobytes())
    remote = remote_of(b, b.register(remote_mem))
    local = a.register(local_mem)
    ops = [TransferOp(local, i * 16, remote, i * 16, 16) for i in range(count)]
    a.write(ops).result(timeout=10)
    assert remote_mem == local_mem
    local_mem[:] = bytes(len(local_mem))
    a.read(ops).result(timeout=10)
    assert remote_mem == local_mem

    big_src = pattern(8 << 20, seed=4)
    big_dst = np.zeros_like(big_src)
    big_remote = remote_of(b, b.register(big_src))
    big_local = a.register(big_dst)
    a.read([TransferOp(big_local, i << 20, big_remote, i << 20, 1 << 20) for i in range(8)]).result(timeout=10)
    assert np.array_equal(big_src, big_dst)


def test_one_batch_may_span_several_peers(pair):
    a, b = pair
    c = LoopbackTransport()
    try:
        from_b, from_c = bytearray(b"B" * 100), bytearray(b"C" * 100)
        rb, rc = remote_of(b, b.register(from_b)), remote_of(c, c.register(from_c))
        dst = bytearray(200)
        local = a.register(dst)
        a.read([TransferOp(local, 0, rb, 0, 100), TransferOp(local, 100, rc, 0, 100)]).result(timeout=5)
        assert dst == from_b + from_c
    finally:
        c.close()


def test_empty_batch_completes_at_once(pair):
    a, _ = pair
    assert a.read([]).done() and a.write([]).result() is None


def test_concurrent_batches_from_many_threads(pair):
    a, b = pair
    src = pattern(1 << 20, seed=5)
    remote = remote_of(b, b.register(src))
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            dst = np.zeros(1 << 16, dtype=np.uint8)
            local = a.register(dst)
            for round_ in range(10):
                off = ((n * 10 + round_) * 4096) % ((1 << 20) - (1 << 16))
                a.read([TransferOp(local, 0, remote, off, 1 << 16)]).result(timeout=5)
                assert np.array_equal(dst, src[off : off + (1 << 16)])
            a.deregister(local)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors


def test_register_needs_a_writable_buffer(pair):
    a, _ = pair
    with pytest.raises(InvalidArgument, match=r"register\(buffer\): buffer is read-only"):
        a.register(b"immutable")
    with pytest.raises(InvalidArgument, match=r"register\(buffer\): expected a buffer"):
        a.register("text")


def test_bounds_and_arguments_are_checked_synchronously(pair):
    a, b = pair
    remote = remote_of(b, b.register(bytearray(100)))
    local = a.register(bytearray(50))
    cases = [
        (TransferOp(local, 40, remote, 0, 20), r"ops\[0\]: local_offset 40 \+ length 20 exceeds local region \d+ of 50"),
        (TransferOp(local, 0, remote, 90, 20), r"ops\[0\]: remote_offset 90 \+ length 20 exceeds remote region \d+ of 100"),
        (TransferOp(local, -1, remote, 0, 1), r"ops\[0\].local_offset: expected an integer >= 0, got -1"),
        (TransferOp(local, 0, remote, 0, 1.5), r"ops\[0\].length: expected an integer >= 0, got 1.5"),
        (TransferOp(local, 0, RemoteRegion("http://x:1", remote.descriptor), 0, 1),
         r"ops\[0\].remote.address: expected a loopback address like 'tcp://127.0.0.1:41234', got 'http://x:1'"),
        (TransferOp(local, 0, RemoteRegion(b.address, b"short"), 0, 1),
         r"ops\[0\].remote.descriptor: expected a 28-byte loopback region descriptor .*got 5 bytes"),
        (TransferOp(local, 0, RemoteRegion(b.address, b"X" * 28), 0, 1), r"not a loopback region descriptor"),
        (TransferOp(Region(99, 50, local.descriptor), 0, remote, 0, 1),
         r"ops\[0\].local: region 99 is not registered with this endpoint"),
        (TransferOp(None, 0, remote, 0, 1), r"ops\[0\].local: region None is not registered with this endpoint"),
        (TransferOp(local, 0, None, 0, 1), r"ops\[0\].remote: expected a RemoteRegion, got NoneType"),
    ]
    for op, match in cases:
        with pytest.raises(InvalidArgument, match=match):
            a.read([op])
    with pytest.raises(InvalidArgument, match=r"ops\[1\]: expected a TransferOp, got str"):
        a.write([TransferOp(local, 0, remote, 0, 1), "op"])
    with pytest.raises(InvalidArgument, match=r"read: timeout_s must be a number of seconds > 0, got 0"):
        a.read([TransferOp(local, 0, remote, 0, 1)], timeout_s=0)


def test_a_region_of_another_endpoint_is_not_local(pair):
    a, b = pair
    theirs = b.register(bytearray(10))
    with pytest.raises(InvalidArgument, match=r"ops\[0\].local: region \d+ is not registered with this endpoint"):
        a.read([TransferOp(theirs, 0, remote_of(b, theirs), 0, 1)])


def test_deregistered_remote_region_fails_the_future_and_the_connection_stays_usable(pair):
    a, b = pair
    gone, kept = b.register(bytearray(64)), b.register(bytearray(b"k" * 64))
    dst = bytearray(b"\x01" * 64)
    local = a.register(dst)
    b.deregister(gone)
    future = a.write([TransferOp(local, 0, remote_of(b, kept), 0, 8), TransferOp(local, 0, remote_of(b, gone), 0, 64)])
    with pytest.raises(TransportError, match=r"ops\[1\]: region \d+ is not registered at tcp://127.0.0.1:\d+"):
        future.result(timeout=5)
    with pytest.raises(TransportError, match="not registered"):
        a.read([TransferOp(local, 0, remote_of(b, gone), 0, 64)]).result(timeout=5)
    assert dst == b"\x01" * 64, "a refused read must leave the destination untouched"
    a.read([TransferOp(local, 0, remote_of(b, kept), 0, 64)]).result(timeout=5)
    with pytest.raises(NotFound, match=r"deregister: region \d+ is not registered with tcp://"):
        b.deregister(gone)


def test_server_refuses_out_of_bounds_even_with_a_forged_descriptor(pair):
    a, b = pair
    real = b.register(bytearray(16))
    nonce = struct.unpack("<4sQQQ", real.descriptor)[1]
    forged = RemoteRegion(b.address, struct.pack("<4sQQQ", b"PFLB", nonce, real.region_id, 1 << 20))
    local = a.register(bytearray(64))
    with pytest.raises(InvalidArgument, match=r"ops\[0\]: remote_offset 0 \+ length 64 exceeds region"):
        a.read([TransferOp(local, 0, forged, 0, 64)]).result(timeout=5)


def test_stale_descriptor_from_a_closed_endpoint_on_the_same_port_fails_cleanly():
    old = LoopbackTransport()
    port = int(old.address.rsplit(":", 1)[1])
    stale = remote_of(old, old.register(bytearray(b"old" * 10)))
    old.close()
    new = LoopbackTransport(LoopbackOptions(port=port))
    client = LoopbackTransport()
    try:
        assert new.address == stale.address
        new.register(bytearray(b"new" * 10))  # same region id as the stale one
        local = client.register(bytearray(30))
        with pytest.raises(TransportError, match=r"descriptor of region 1 is from an endpoint that no longer exists"):
            client.read([TransferOp(local, 0, stale, 0, 30)]).result(timeout=5)
    finally:
        new.close()
        client.close()


def test_pooled_connection_to_a_restarted_peer_is_replaced():
    server = LoopbackTransport()
    port = int(server.address.rsplit(":", 1)[1])
    client = LoopbackTransport()
    try:
        local = client.register(bytearray(8))
        first = remote_of(server, server.register(bytearray(b"x" * 8)))
        client.read([TransferOp(local, 0, first, 0, 8)]).result(timeout=5)
        server.close()  # the client's pooled connection is now dead
        server = LoopbackTransport(LoopbackOptions(port=port))
        fresh = remote_of(server, server.register(bytearray(b"y" * 8)))
        client.read([TransferOp(local, 0, fresh, 0, 8)]).result(timeout=5)
        assert bytes(client._regions[local.region_id]) == b"y" * 8
    finally:
        server.close()
        client.close()


def test_unreachable_peer_is_a_transport_error():
    port = free_port()
    with LoopbackTransport() as a:
        with pytest.raises(TransportError, match=rf"cannot connect to tcp://127.0.0.1:{port}: connection refused"):
            a.connect(f"tcp://127.0.0.1:{port}", timeout_s=1)
        fake = RemoteRegion(f"tcp://127.0.0.1:{port}", struct.pack("<4sQQQ", b"PFLB", 1, 1, 64))
        local = a.register(bytearray(64))
        with pytest.raises(TransportError, match=rf"cannot connect to tcp://127.0.0.1:{port}: connection refused"):
            a.read([TransferOp(local, 0, fake, 0, 64)]).result(timeout=5)
        with pytest.raises(InvalidArgument, match=r"connect\(address\): expected a loopback address"):
            a.connect("127.0.0.1:80")


def test_silent_peer_times_out():
    """A peer that accepts but never answers: the future fails after timeout_s."""
    with socket.create_server(("127.0.0.1", 0)) as silent, LoopbackTransport() as a:
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        fake = RemoteRegion(address, struct.pack("<4sQQQ", b"PFLB", 1, 1, 64))
        local = a.register(bytearray(64))
        start = time.monotonic()
        with pytest.raises(TransportError, match=rf"read of 1 ops from {address}: timed out after 0.3 s"):
            a.read([TransferOp(local, 0, fake, 0, 64)], timeout_s=0.3).result(timeout=5)
        assert time.monotonic() - start < 3


def test_connect_caches_a_connection(pair):
    a, b = pair
    a.connect(b.address)
    a.connect(b.address)
    assert len(a._idle[b.address]) == 1


def test_peer_that_closes_mid_batch_fails_the_batch(pair):
    a, b = pair
    remote = remote_of(b, b.register(bytearray(1 << 20)))
    local = a.register(bytearray(1 << 20))
    a.connect(b.address)
    b.close()
    with pytest.raises(TransportError, match=r"cannot connect to tcp://127.0.0.1:\d+: connection refused"):
        a.read([TransferOp(local, 0, remote, 0, 1 << 20)]).result(timeout=5)


def test_unknown_opcode_is_refused_and_the_connection_dropped(pair):
    _, b = pair
    with socket.create_connection(("127.0.0.1", int(b.address.rsplit(":", 1)[1])), timeout=2) as raw:
        raw.sendall(struct.pack("<BxxxIQQQQ", 9, 7, 0, 1, 0, 0))
        answer = raw.recv(16)
        assert struct.unpack("<BxxxIQ", answer) == (loopback._BAD_REQUEST, 7, 0)
        assert raw.recv(1) == b""


def test_close_is_idempotent_and_stops_everything(pair):
    a, b = pair
    a.connect(b.address)
    region = a.register(bytearray(8))
    a.close()
    a.close()
    assert not a._server.is_alive()
    with pytest.raises(ClosedError, match=r"transport tcp://127.0.0.1:\d+ is closed"):
        a.register(bytearray(8))
    with pytest.raises(ClosedError):
        a.read([TransferOp(region, 0, RemoteRegion(b.address, region.descriptor), 0, 8)])
    with pytest.raises(TransportError, match="connection refused"):
        b.connect(a.address, timeout_s=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"port": 70000}, r"loopback.port: expected a port 0..65535"), ({"host": ""}, r"loopback.host: expected a host")],
)
def test_options_are_validated(kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        LoopbackOptions(**kwargs)


def test_listening_on_a_taken_port_is_a_transport_error(pair):
    a, _ = pair
    port = int(a.address.rsplit(":", 1)[1])
    with pytest.raises(TransportError, match=rf"loopback: cannot listen on 127.0.0.1:{port}"):
        LoopbackTransport(LoopbackOptions(port=port))
