"""Damage on disk is a miss, counted and logged, never wrong bytes: flipped payload and header
bytes, torn (truncated) segments, torn header pages, and a header that names another record."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pegaflow_ssd.format import PAGE

from .conftest import KIB, blocks_of, keys_of, read_back

SIZE = 12 * KIB  # 16 KiB records: four per 64 KiB segment


def _location(tier, key) -> tuple[Path, int]:
    rec = tier._index[key]  # backdoor: where the record lives, to damage exactly it
    return rec.seg.path, rec.offset


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()


def test_flipped_payload_byte_is_a_counted_miss(make_tier, io_mode: str, caplog: pytest.LogCaptureFixture) -> None:
    tier = make_tier(io=io_mode)
    keys, blocks = keys_of(4), blocks_of(4, SIZE)
    tier.put(keys, blocks)
    path, offset = _location(tier, keys[1])
    _flip(path, offset + PAGE + 777)
    dests = [bytearray(b"\x5a" * SIZE) for _ in keys]
    with caplog.at_level(logging.ERROR, logger="pegaflow.ssd"):
        hits = tier.get_into(keys, dests)
    assert hits == [True, False, True, True]
    assert bytes(dests[1]) == b"\x5a" * SIZE, "a corrupt block must not reach the destination"
    assert [bytes(d) for i, d in enumerate(dests) if i != 1] == [b for i, b in enumerate(blocks) if i != 1]
    assert tier.integrity_failures == 1
    assert f"{path} at offset {offset}: payload xxhash64 mismatch" in caplog.text
    assert tier.contains(keys[1:2]) == [False], "a corrupt record is dropped from the index"


def test_flipped_header_byte_is_caught_at_read_and_at_scan(make_tier, caplog: pytest.LogCaptureFixture) -> None:
    tier = make_tier()
    keys, blocks = keys_of(8), blocks_of(8, SIZE)
    tier.put(keys, blocks)
    path, offset = _location(tier, keys[2])
    _flip(path, offset + 20)  # inside the sequence number
    assert read_back(tier, keys[2:3], SIZE)[0] == [False]
    assert tier.integrity_failures == 1
    tier.close()
    with caplog.at_level(logging.ERROR, logger="pegaflow.ssd"):
        again = make_tier()
    assert again.integrity_failures == 1
    assert f"{path} at offset {offset}: header checksum mismatch" in caplog.text
    assert again.contains(keys) == [i != 2 for i in range(8)]
    # the scan resynchronised after the bad header: the records behind it in that segment are back
    good = [i for i in range(8) if i != 2]
    assert read_back(again, [keys[i] for i in good], SIZE) == ([True] * 7, [blocks[i] for i in good])


def test_torn_header_page_resynchronises_to_the_next_record(make_tier) -> None:
    tier = make_tier()
    keys, blocks = keys_of(4), blocks_of(4, SIZE)
    tier.put(keys, blocks)
    path, offset = _location(tier, keys[0])
    assert offset == 0
    tier.close()
    with open(path, "r+b") as f:  # the second half of the page never made it: torn write
        f.seek(offset + PAGE // 2)
        f.write(b"\xee" * (PAGE // 2))
    again = make_tier()
    # the checksummed fields live in the first bytes and the payload is untouched: the block is
    # intact, and the damaged padding is not a reason to lose it. Now tear the fields instead.
    assert again.integrity_failures == 0
    assert read_back(again, keys[:1], SIZE) == ([True], blocks[:1])
    again.close()
    with open(path, "r+b") as f:
        f.seek(offset + 8)
        f.write(b"\x00" * 64)
    third = make_tier()
    assert third.integrity_failures == 1
    assert third.contains(keys) == [False, True, True, True]
    assert read_back(third, keys[1:], SIZE) == ([True] * 3, blocks[1:])


def test_truncated_segment_loses_only_the_cut_record(make_tier, io_mode: str) -> None:
    tier = make_tier(io=io_mode)
    keys, blocks = keys_of(4), blocks_of(4, SIZE)
    tier.put(keys, blocks)  # all four in one 64 KiB segment, at 0, 16, 32 and 48 KiB
    path, offset = _location(tier, keys[3])
    tier.close()
    import os

    os.truncate(path, offset + PAGE + 5000)  # mid-payload of the last record
    again = make_tier(io=io_mode)
    hits, got = read_back(again, keys, SIZE)
    assert hits == [True, True, True, False]
    assert got[:3] == blocks[:3]
    assert again.integrity_failures == 1
    assert again.usage().blocks == 3


def test_header_naming_another_record_is_never_served(make_tier) -> None:
    tier = make_tier()
    keys, blocks = keys_of(2), blocks_of(2, SIZE)
    tier.put(keys, blocks)
    (path_a, off_a), (path_b, off_b) = _location(tier, keys[0]), _location(tier, keys[1])
    with open(path_b, "rb") as f:
        f.seek(off_b)
        record_b = f.read(PAGE + SIZE)
    with open(path_a, "r+b") as f:  # a misdirected write: B's whole record lands where A lives
        f.seek(off_a)
        f.write(record_b)
    hits, got = read_back(tier, keys, SIZE)
    assert hits == [False, True] and got[1] == blocks[1]
    assert tier.integrity_failures == 1
