"""What RDMA endpoints tell each other: the address, the region descriptor, connection set-up.

* **Address** ``rdma://host:port``: where the endpoint's connection-setup listener runs (a small
  TCP service, the out-of-band channel every verbs application needs before its first queue pair
  can talk, as ``rdma_cm`` or ``ibv_rc_pingpong`` use one).
* **Region descriptor** (published through the cluster index as ``rdma.pool``): magic, version,
  the owner endpoint's nonce, region id, size, the region's virtual address, its memory-region
  chunk size, and one rkey per (NIC, chunk). With it a peer addresses any byte of the region with
  one-sided READ/WRITE and no code of the owner runs per transfer.
* **Connection set-up** on the control connection, one JSON message per line-length-prefixed
  frame: ``hello`` (nonces, NIC count), then one ``connect`` per queue pair carrying the
  requester's GID, LID, QPN, PSN, MTU and read depth, answered by ``accept`` with the same fields
  of the queue pair the owner made for it (or ``error``). A queue pair broken by an error is
  replaced with a ``connect`` that names the one it ``replaces``. The owner destroys a peer's queue
  pairs when that peer's control connection closes, and a requester takes the closing of the
  control connection as the owner's death.
"""

from __future__ import annotations

import functools
import json
import socket
import struct
from dataclasses import dataclass
from typing import Any

from pegaflow_core.errors import InvalidArgument

MAGIC = b"PFRD"
VERSION = 1
HEADER = struct.Struct("<4sBBHQQQQQ")  # magic, version, nics, reserved, nonce, region id, nbytes, addr, chunk
RKEY = struct.Struct("<I")
FRAME = struct.Struct("<I")  # control-message length prefix
MAX_FRAME = 1 << 16


@dataclass(frozen=True)
class RemoteDescriptor:
    """A peer's region as its descriptor describes it. ``rkeys[nic][chunk]``."""

    nonce: int
    region_id: int
    nbytes: int
    addr: int
    chunk: int
    rkeys: tuple[tuple[int, ...], ...]

    def rkey(self, nic: int, offset: int) -> int:
        return self.rkeys[nic % len(self.rkeys)][offset // self.chunk]


def chunk_count(nbytes: int, chunk: int) -> int:
    return max(1, -(-nbytes // chunk))


def pack_descriptor(nonce: int, region_id: int, nbytes: int, addr: int, chunk: int,
                    rkeys: list[list[int]]) -> bytes:
    chunks = chunk_count(nbytes, chunk)
    if not rkeys or any(len(per_nic) != chunks for per_nic in rkeys):
        raise ValueError(f"expected {chunks} rkeys per NIC for {nbytes} bytes in chunks of {chunk}")
    head = HEADER.pack(MAGIC, VERSION, len(rkeys), 0, nonce, region_id, nbytes, addr, chunk)
    return head + b"".join(RKEY.pack(k) for per_nic in rkeys for k in per_nic)


@functools.lru_cache(maxsize=4096)
def decode_descriptor(descriptor: bytes) -> RemoteDescriptor | str:
    """The descriptor, or why it is not one (a string); cached, since a pool's descriptor is
    decoded for every batch that reads it."""
    if len(descriptor) < HEADER.size:
        return f"expected an RDMA region descriptor (Region.descriptor from RdmaTransport.register), got {len(descriptor)} bytes"
    magic, version, nics, _, nonce, region_id, nbytes, addr, chunk = HEADER.unpack_from(descriptor)
    if magic != MAGIC:
        return f"not an RDMA region descriptor (magic {magic!r}, expected {MAGIC!r})"
    if version != VERSION:
        return f"RDMA region descriptor version {version}, this pegaflow-rdma reads version {VERSION}"
    if nics < 1 or chunk < 1 or nbytes < 1:
        return "malformed RDMA region descriptor (no NIC, no chunk or no bytes)"
    chunks = chunk_count(nbytes, chunk)
    if len(descriptor) != HEADER.size + nics * chunks * RKEY.size:
        return (f"malformed RDMA region descriptor: {len(descriptor)} bytes, expected "
                f"{HEADER.size + nics * chunks * RKEY.size} for {nics} NICs x {chunks} chunks")
    keys = [RKEY.unpack_from(descriptor, HEADER.size + i * RKEY.size)[0] for i in range(nics * chunks)]
    rkeys = tuple(tuple(keys[n * chunks : (n + 1) * chunks]) for n in range(nics))
    return RemoteDescriptor(nonce, region_id, nbytes, addr, chunk, rkeys)


def parse_descriptor(descriptor: Any, what: str) -> tuple[int, int, int]:
    """``(nonce, region id, nbytes)``, the shape ``plan_ops`` checks bounds with."""
    if not isinstance(descriptor, (bytes, bytearray)):
        raise InvalidArgument(f"{what}: expected an RDMA region descriptor (bytes), got {type(descriptor).__name__}")
    decoded = decode_descriptor(bytes(descriptor))
    if isinstance(decoded, str):
        raise InvalidArgument(f"{what}: {decoded}")
    return decoded.nonce, decoded.region_id, decoded.nbytes


def parse_address(address: Any, what: str) -> tuple[str, int]:
    if isinstance(address, str) and address.startswith("rdma://"):
        host, sep, port = address[len("rdma://"):].rpartition(":")
        if sep and host and port.isdigit() and 0 < int(port) <= 65535:
            return host.strip("[]"), int(port)
    raise InvalidArgument(f"{what}: expected an RDMA address like 'rdma://10.0.0.1:41234', got {address!r}")


def format_address(host: str, port: int) -> str:
    return f"rdma://[{host}]:{port}" if ":" in host else f"rdma://{host}:{port}"


@dataclass(frozen=True)
class QpInfo:
    """One side of a queue pair's connection: what the other side's QP needs to reach it."""

    gid: str
    lid: int
    qpn: int
    psn: int
    mtu: int  # IBV_MTU_* enum value
    rd_atomic: int  # RDMA READs this side lets be outstanding (as requester and as responder)

    def to_json(self) -> dict[str, Any]:
        return {"gid": self.gid, "lid": self.lid, "qpn": self.qpn, "psn": self.psn, "mtu": self.mtu,
                "rd_atomic": self.rd_atomic}

    @classmethod
    def from_json(cls, message: dict[str, Any]) -> QpInfo:
        try:
            info = cls(str(message["gid"]), int(message["lid"]), int(message["qpn"]), int(message["psn"]),
                       int(message["mtu"]), int(message["rd_atomic"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed queue-pair information {message!r}: {exc}") from None
        if not 0 <= info.psn < 1 << 24 or not 0 < info.qpn < 1 << 24:
            raise ProtocolError(f"queue-pair information out of range: {message!r}")
        return info


class ProtocolError(Exception):
    """The peer answered something that is not this protocol."""


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    payload = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(FRAME.pack(len(payload)) + payload)


def recv_message(sock: socket.socket) -> dict[str, Any] | None:
    """The next message, or None when the peer closed the connection cleanly between messages."""
    head = _recv_exact(sock, FRAME.size, allow_eof=True)
    if head is None:
        return None
    (length,) = FRAME.unpack(head)
    if length > MAX_FRAME:
        raise ProtocolError(f"control message of {length} bytes (at most {MAX_FRAME})")
    body = _recv_exact(sock, length, allow_eof=False)
    try:
        message = json.loads(body)
    except ValueError:
        raise ProtocolError("control message is not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError(f"control message without a type: {message!r}")
    return message


def _recv_exact(sock: socket.socket, n: int, *, allow_eof: bool) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            if allow_eof and got == 0:
                return None
            raise ConnectionError(f"peer closed the control connection inside a message ({got} of {n} bytes)")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
