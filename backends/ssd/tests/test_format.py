"""The record header format: round trip, and that every kind of damage is told apart from a
valid header and from the clean (all-zero) end of a log."""

from __future__ import annotations

import pytest

from pegaflow_core import BlockKey, InvalidArgument
from pegaflow_ssd.format import (
    FLAG_DEAD,
    MAX_KEY_BYTES,
    PAGE,
    HeaderState,
    encode_key,
    header_page,
    parse_header,
    payload_hash,
    record_bytes,
)


def test_header_round_trip_keeps_every_field() -> None:
    key = BlockKey("model/x", b"\x01\x02\x03", 7)
    page = header_page(encode_key(key), seq=42, payload_len=65536, phash=payload_hash(b"abc"))
    state, header, reason = parse_header(page)
    assert state == HeaderState.VALID and reason == ""
    assert header is not None
    assert header.key() == key and header.seq == 42 and header.payload_len == 65536
    assert header.payload_hash == payload_hash(b"abc") and not header.dead
    assert header.record_len == PAGE + 65536


def test_dead_flag_is_part_of_the_checksummed_header() -> None:
    page = header_page(encode_key(BlockKey("m", b"h")), 1, 10, 0, FLAG_DEAD)
    state, header, _ = parse_header(page)
    assert state == HeaderState.VALID and header is not None and header.dead


def test_record_sizes_are_page_aligned() -> None:
    assert record_bytes(1) == 2 * PAGE
    assert record_bytes(PAGE) == 2 * PAGE
    assert record_bytes(PAGE + 1) == 3 * PAGE
    assert record_bytes(2 << 20) == (2 << 20) + PAGE


def test_all_zero_page_is_the_clean_end_of_a_log() -> None:
    assert parse_header(bytes(PAGE))[0] == HeaderState.EMPTY


@pytest.mark.parametrize("position", [0, 9, 12, 16, 24, 32, 40, 45])
def test_any_flipped_byte_in_the_header_is_corrupt(position: int) -> None:
    page = header_page(encode_key(BlockKey("model", b"hash")), 5, 100, 123)
    page[position] ^= 0x40
    state, header, reason = parse_header(page)
    assert state == HeaderState.CORRUPT and header is None and reason


def test_garbage_page_is_corrupt_not_empty() -> None:
    page = bytearray(PAGE)
    page[2000] = 1
    assert parse_header(page)[0] == HeaderState.CORRUPT


def test_key_too_long_for_a_header_page_is_refused() -> None:
    key = BlockKey("n" * MAX_KEY_BYTES, b"h")
    with pytest.raises(InvalidArgument, match="shorter namespace"):
        encode_key(key)
