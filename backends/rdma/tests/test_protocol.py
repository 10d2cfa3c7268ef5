"""The descriptor, the address and the connection-setup framing (no verbs needed)."""

from __future__ import annotations

import socket
import threading

import pytest

from pegaflow_core.errors import InvalidArgument
from pegaflow_rdma import protocol as P


def test_descriptor_round_trip() -> None:
    rkeys = [[0x1234, 0x5678, 0x9ABC], [0x1111, 0x2222, 0x3333]]
    raw = P.pack_descriptor(nonce=7, region_id=3, nbytes=5 << 20, addr=0x7F0000001000, chunk=2 << 20, rkeys=rkeys)
    desc = P.decode_descriptor(raw)
    assert isinstance(desc, P.RemoteDescriptor)
    assert (desc.nonce, desc.region_id, desc.nbytes, desc.addr, desc.chunk) == (7, 3, 5 << 20, 0x7F0000001000, 2 << 20)
    assert desc.rkey(0, 0) == 0x1234 and desc.rkey(0, (4 << 20) + 5) == 0x9ABC
    assert desc.rkey(1, 2 << 20) == 0x2222 and desc.rkey(3, 0) == 0x1111  # NIC 3 of 2 wraps to 1
    assert P.parse_descriptor(raw, "d") == (7, 3, 5 << 20)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00" * 8, r"d: expected an RDMA region descriptor .* got 8 bytes"),
        (b"PFLB" + bytes(60), r"d: not an RDMA region descriptor \(magic b'PFLB'"),
        (P.HEADER.pack(P.MAGIC, 9, 1, 0, 1, 1, 64, 0, 64) + bytes(4), r"d: RDMA region descriptor version 9"),
        (P.HEADER.pack(P.MAGIC, 1, 2, 0, 1, 1, 64, 0, 64) + bytes(4), r"d: malformed RDMA region descriptor: .* 2 NICs x 1 chunks"),
        (P.HEADER.pack(P.MAGIC, 1, 0, 0, 1, 1, 64, 0, 64), r"d: malformed RDMA region descriptor \(no NIC"),
    ],
)
def test_bad_descriptors_are_invalid(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        P.parse_descriptor(raw, "d")


def test_descriptor_must_be_bytes() -> None:
    with pytest.raises(InvalidArgument, match=r"d: expected an RDMA region descriptor \(bytes\), got str"):
        P.parse_descriptor("PFRD", "d")


def test_pack_checks_the_key_table() -> None:
    with pytest.raises(ValueError, match="expected 3 rkeys per NIC"):
        P.pack_descriptor(1, 1, 5 << 20, 0, 2 << 20, [[1, 2]])


def test_addresses() -> None:
    assert P.parse_address("rdma://10.0.0.1:18515", "a") == ("10.0.0.1", 18515)
    assert P.parse_address("rdma://[fe80::1]:7", "a") == ("fe80::1", 7)
    assert P.format_address("fe80::1", 7) == "rdma://[fe80::1]:7"
    for bad in ("tcp://10.0.0.1:1", "rdma://10.0.0.1", "rdma://:5", "rdma://h:0", 5):
        with pytest.raises(InvalidArgument, match=r"a: expected an RDMA address like 'rdma://10\.0\.0\.1:41234'"):
            P.parse_address(bad, "a")


def test_qp_info_round_trip_and_checks() -> None:
    info = P.QpInfo("0000:0000:0000:0000:0000:ffff:0a4d:0001", 0, 17, 0xABCDE, 3, 16)
    assert P.QpInfo.from_json(info.to_json()) == info
    with pytest.raises(P.ProtocolError, match="malformed queue-pair information"):
        P.QpInfo.from_json({"gid": "x"})
    with pytest.raises(P.ProtocolError, match="out of range"):
        P.QpInfo.from_json({**info.to_json(), "psn": 1 << 24})


def test_framing_over_a_real_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        big = {"type": "connect", "blob": "x" * 5000}
        sender = threading.Thread(target=lambda: [P.send_message(a, {"type": "hello", "nonce": 5}), P.send_message(a, big)])
        sender.start()
        assert P.recv_message(b) == {"type": "hello", "nonce": 5}
        assert P.recv_message(b) == big
        sender.join()
        a.sendall(P.FRAME.pack(P.MAX_FRAME + 1))
        with pytest.raises(P.ProtocolError, match="control message of"):
            P.recv_message(b)
        a.sendall(P.FRAME.pack(4) + b"[12]")
        with pytest.raises(P.ProtocolError, match="without a type"):
            P.recv_message(b)
        a.sendall(P.FRAME.pack(10) + b"abc")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionError, match="inside a message"):
            P.recv_message(b)
    c, d = socket.socketpair()
    with c, d:
        c.close()
        assert P.recv_message(d) is None  # a clean close between messages
