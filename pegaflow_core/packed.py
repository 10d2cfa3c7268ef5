"""The packed wire form of a request's block ids and hashes (``packed_*`` fields of SaveRequest and
QueryRequest): one bytes field each instead of a repeated field, so neither side builds a Python
object per block just to move the batch. The client encodes, the daemon decodes; both forms stay
accepted, so clients older than the packed form keep working."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InvalidArgument
from .keys import MAX_HASH_BYTES, BlockKey, KeyCache

assert array("I").itemsize == 4, "the packed form needs a 4-byte array('I')"


def pack_block_ids(block_ids: Sequence[int]) -> bytes:
    """Little-endian uint32 ids. A negative, too large or non-integer id is refused here, as the
    repeated field refused it before."""
    try:
        ids = array("I", block_ids)
    except (OverflowError, TypeError) as exc:
        bad = next((i for i, b in enumerate(block_ids) if not _is_id(b)), None)
        where = f"block_ids[{bad}] = {block_ids[bad]!r}" if bad is not None else "block_ids"
        raise InvalidArgument(f"{where}: expected engine block ids in [0, 2**32) ({exc})") from None
    if sys.byteorder == "big":
        ids.byteswap()
    return ids.tobytes()


def _is_id(block_id: Any) -> bool:
    return isinstance(block_id, (int, np.integer)) and not isinstance(block_id, bool) and 0 <= block_id < 1 << 32


def pack_hashes(block_hashes: Sequence[bytes]) -> tuple[bytes, int] | None:
    """``(concatenation, size of each hash)``, or None when the hashes are not all bytes of one
    valid size: those go in the repeated field, where the daemon (or protobuf, for a non-bytes
    hash) names the bad one. One C-level pass for the sizes: this runs for every Save and Query."""
    if not block_hashes:
        return None
    sizes = set(map(len, block_hashes))
    if len(sizes) != 1 or not 0 < (size := sizes.pop()) <= MAX_HASH_BYTES:
        return None
    try:
        joined = b"".join(block_hashes)
    except TypeError:  # a str among them
        return None
    return (joined, size) if len(joined) == size * len(block_hashes) else None  # a memoryview of wider items


def block_ids_of(request: Any) -> np.ndarray:
    """A SaveRequest's block ids, from whichever form it used, as a uint32 array."""
    if request.packed_block_ids:
        if request.block_ids:
            raise InvalidArgument("block_ids and packed_block_ids are both set: send one form")
        if len(request.packed_block_ids) % 4:
            raise InvalidArgument(f"packed_block_ids: {len(request.packed_block_ids)} bytes is not a whole number of uint32 ids")
        return np.frombuffer(request.packed_block_ids, dtype="<u4")
    return np.array(request.block_ids, dtype=np.uint32)


def hashes_of(request: Any) -> list[bytes]:
    """A Save or Query request's hashes, from whichever form it used; the packed form is
    checked whole and split in C (sizes are validated once, not per hash)."""
    if not (request.packed_block_hashes or request.hash_bytes):
        return list(request.block_hashes)
    if request.block_hashes:
        raise InvalidArgument("block_hashes and packed_block_hashes are both set: send one form")
    packed, size = request.packed_block_hashes, request.hash_bytes
    if not 0 < size <= MAX_HASH_BYTES:
        raise InvalidArgument(f"hash_bytes: expected 1..{MAX_HASH_BYTES}, got {size}")
    if len(packed) % size:
        raise InvalidArgument(f"packed_block_hashes: {len(packed)} bytes is not a whole number of {size}-byte hashes")
    return np.frombuffer(packed, dtype=f"V{size}").tolist()  # bytes objects, NULs kept


def keys_of(request: Any, cache: KeyCache) -> list[BlockKey]:
    """A Save or Query request's keys (``cache``: its context's namespace and shard)."""
    return cache.keys(hashes_of(request))
