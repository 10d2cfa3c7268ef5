"""The wire format of pegaflow's UCX transport: tagged messages that give one-sided semantics.

The ucxx Python binding exposes UCX's tag, stream and active-message APIs but not its RMA API
(``ucp_mem_map``, ``ucp_rkey_pack``, ``ucp_get_nbx``/``ucp_put_nbx``: libucxx has them in C++,
the Cython layer does not bind them). So the owner of a region serves it from its progress
thread, as the loopback transport's server thread does, while the data itself moves as one UCX
tagged message per op: received straight into the destination buffer (no copy in Python, and
zero-copy rendezvous on transports that support it).

Tags are worker-wide in UCX, not per endpoint, so every message names its connection in the tag::

    bit 63      direction: 1 = to the region owner (server), 0 = to the requester (client)
    bits 62-32  connection id, chosen by the client, unique among the live connections of both
    bits 31-0   sequence number: 0 = request header; a chunk of n ops takes n + 1 numbers,
                the chunk's own (its status) and one per op (its data)

Handshake (UCX stream API, which is per endpoint): the client sends ``HELLO`` (magic, connection
id); the server answers ``WELCOME`` (magic, status, its endpoint nonce) once it has posted the
receive for that connection's request headers, or refuses an id another client already uses.
(Endpoints whose UCX error-handling modes differ never get this far: UCX refuses them itself.)

A request header is ``REQUEST`` (op, count, chunk sequence) followed by ``count`` ``OP_ENTRY``
(endpoint nonce, region id, offset, length). READ: the client posts receives for every op's data
and the chunk's status, then sends the header; the server sends each op's bytes (or an empty
message when it refuses the chunk, so every posted receive completes) and then the status. WRITE:
the server posts receives into its region and answers ``READY``; only then does the client send
the data, and the server answers ``DONE`` when all of it has landed. Data therefore never arrives
before its receive is posted, and a refused chunk moves no bytes.

A region descriptor is ``DESCRIPTOR``: magic, scheme (1 = tagged; 2 is reserved for an RMA
descriptor carrying a packed rkey and base address), endpoint nonce, region id, nbytes. The nonce
is random per endpoint, so a descriptor kept from an endpoint that closed is refused clearly.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from pegaflow_core.errors import InvalidArgument

MAGIC = b"PFUX"
SCHEME_TAGGED = 1

DESCRIPTOR = struct.Struct("<4sBxxxQQQ")  # magic, scheme, nonce, region id, nbytes
HELLO = struct.Struct("<4sIQ")  # magic, connection id, reserved
WELCOME = struct.Struct("<4sBxxxQ")  # magic, status, server endpoint nonce
REQUEST = struct.Struct("<BxxxII")  # op, count, chunk sequence
OP_ENTRY = struct.Struct("<QQQQ")  # nonce, region id, offset, length
STATUS = struct.Struct("<BxxxIQ")  # status, index of the first refused op in the chunk, reserved

READ, WRITE = 1, 2
OK, NO_REGION, STALE, OUT_OF_BOUNDS, BAD_REQUEST, DUPLICATE, READY = 0, 1, 2, 3, 4, 5, 6

MAX_CHUNK_OPS = 1024  # ops per request header: 32 KiB of entries, one receive buffer per connection
MAX_REQUEST = REQUEST.size + MAX_CHUNK_OPS * OP_ENTRY.size
SEQ_SPAN = 1 << 32
CID_LIMIT = 1 << 31
TO_SERVER = 1 << 63


def tag(to_server: bool, cid: int, seq: int) -> int:
    """The 64-bit UCX tag of one message (see the module docstring)."""
    return (TO_SERVER if to_server else 0) | (cid << 32) | (seq % SEQ_SPAN)


def parse_address(address: Any, what: str) -> tuple[str, str, int]:
    """``ucx://host:port`` → (address, IP to dial, port). Host names are resolved here, in the
    caller's thread, because ucxx wants a numeric IP and the progress thread must never block."""
    if isinstance(address, str) and address.startswith("ucx://"):
        host, sep, port = address[len("ucx://") :].rpartition(":")
        host = host.strip("[]")
        if sep and host and port.isdigit() and 0 < int(port) <= 65535:
            try:
                ip = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
            except (socket.gaierror, UnicodeError):
                raise InvalidArgument(f"{what}: cannot resolve host {host!r} of {address!r}") from None
            return address, ip, int(port)
    raise InvalidArgument(f"{what}: expected a UCX address like 'ucx://127.0.0.1:41234', got {address!r}")


def parse_descriptor(descriptor: Any, what: str) -> tuple[int, int, int]:
    """(nonce, region id, nbytes) of a descriptor made by ``UcxTransport.register``."""
    if not isinstance(descriptor, (bytes, bytearray)) or len(descriptor) != DESCRIPTOR.size:
        got = f"{len(descriptor)} bytes" if isinstance(descriptor, (bytes, bytearray)) else type(descriptor).__name__
        raise InvalidArgument(
            f"{what}: expected a {DESCRIPTOR.size}-byte UCX region descriptor "
            f"(Region.descriptor from UcxTransport.register), got {got}"
        )
    magic, scheme, nonce, region_id, nbytes = DESCRIPTOR.unpack(descriptor)
    if magic != MAGIC:
        raise InvalidArgument(f"{what}: not a UCX region descriptor (magic {magic!r}, expected {MAGIC!r})")
    if scheme != SCHEME_TAGGED:
        raise InvalidArgument(f"{what}: UCX descriptor scheme {scheme} is not supported by this version (expected 1)")
    return nonce, region_id, nbytes
