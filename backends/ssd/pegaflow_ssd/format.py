"""The on-disk record format (see docs/ssd-format.md for the full description).

A record is one 4 KiB header page followed by the payload, padded to a multiple of 4 KiB, so
every record starts and ends on a 4 KiB boundary and can be read or written with O_DIRECT in one
I/O. The header page starts with::

    offset size  field
    0      8     magic b"PGFSSDR\\x00"
    8      2     format version (1)
    10     2     flags (bit 0: dead, set in place by evict)
    12     4     key length K (bytes of BlockKey.encode())
    16     8     sequence number (tier-wide, increasing; the highest wins when a key appears twice)
    24     8     payload length in bytes
    32     8     xxhash64 of the payload (seed 0), verified on every read
    40     K     the encoded BlockKey
    40+K   8     xxhash64 of bytes [0, 40+K): the header checksum, verified at scan and read

and is zero after that. All integers are little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from pegaflow_core import BlockKey, InvalidArgument

PAGE = 4096
MAGIC = b"PGFSSDR\x00"
VERSION = 1
FLAG_DEAD = 0x1

_FIXED = struct.Struct("<8sHHIQQQ")  # magic, version, flags, key_len, seq, payload_len, payload_hash
FIXED_BYTES = _FIXED.size  # 40
CHECKSUM_BYTES = 8
MAX_KEY_BYTES = PAGE - FIXED_BYTES - CHECKSUM_BYTES


def round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def record_bytes(payload_len: int) -> int:
    """Bytes a record of ``payload_len`` occupies on disk: header page + payload padded to 4 KiB."""
    return PAGE + round_up(payload_len)


def payload_hash(data: memoryview | bytes) -> int:
    return xxhash.xxh64_intdigest(data)


@dataclass(frozen=True)
class RecordHeader:
    """A decoded header. ``key_bytes`` is kept encoded: decoding is needed only at scan time."""

    flags: int
    seq: int
    payload_len: int
    payload_hash: int
    key_bytes: bytes

    @property
    def dead(self) -> bool:
        return bool(self.flags & FLAG_DEAD)

    @property
    def record_len(self) -> int:
        return record_bytes(self.payload_len)

    def key(self) -> BlockKey:
        return BlockKey.decode(self.key_bytes)


def encode_key(key: BlockKey) -> bytes:
    """``key.encode()``, refusing keys whose encoding does not fit in one header page."""
    data = key.encode()
    if len(data) > MAX_KEY_BYTES:
        raise InvalidArgument(
            f"key {key!r} encodes to {len(data)} bytes; the ssd tier's record header holds at most "
            f"{MAX_KEY_BYTES} (use a shorter namespace)"
        )
    return data


def pack_header(into: memoryview, key_bytes: bytes, seq: int, payload_len: int, phash: int, flags: int = 0) -> None:
    """Write a header into the first bytes of ``into`` (a page of staging memory) and zero the
    rest of the page, so stale staging bytes never reach the disk."""
    end = FIXED_BYTES + len(key_bytes)
    _FIXED.pack_into(into, 0, MAGIC, VERSION, flags, len(key_bytes), seq, payload_len, phash)
    into[FIXED_BYTES:end] = key_bytes
    struct.pack_into("<Q", into, end, xxhash.xxh64_intdigest(into[:end]))
    into[end + CHECKSUM_BYTES : PAGE] = bytes(PAGE - end - CHECKSUM_BYTES)


def header_page(key_bytes: bytes, seq: int, payload_len: int, phash: int, flags: int = 0) -> bytearray:
    page = bytearray(PAGE)
    pack_header(memoryview(page), key_bytes, seq, payload_len, phash, flags)
    return page


class HeaderState:
    """What a page at a record position turned out to be (see :func:`parse_header`)."""

    VALID = "valid"
    EMPTY = "empty"  # all zeros: the clean end of a segment's log
    CORRUPT = "corrupt"  # anything else: torn write, bit rot, or foreign bytes


def parse_header(page: memoryview | bytes) -> tuple[str, RecordHeader | None, str]:
    """Decode a header page. Returns (state, header or None, reason for CORRUPT)."""
    page = memoryview(page)
    if len(page) < PAGE:
        return HeaderState.CORRUPT, None, f"short page ({len(page)} bytes)"
    magic, version, flags, key_len, seq, payload_len, phash = _FIXED.unpack_from(page, 0)
    if magic != MAGIC:
        if not any(page[:64]) and not any(page):
            return HeaderState.EMPTY, None, ""
        return HeaderState.CORRUPT, None, "bad magic"
    if version != VERSION:
        return HeaderState.CORRUPT, None, f"format version {version}, this tier reads {VERSION}"
    if key_len > MAX_KEY_BYTES:
        return HeaderState.CORRUPT, None, f"key length {key_len} out of range"
    end = FIXED_BYTES + key_len
    (stored,) = struct.unpack_from("<Q", page, end)
    if xxhash.xxh64_intdigest(page[:end]) != stored:
        return HeaderState.CORRUPT, None, "header checksum mismatch"
    return HeaderState.VALID, RecordHeader(flags, seq, payload_len, phash, bytes(page[FIXED_BYTES:end])), ""
