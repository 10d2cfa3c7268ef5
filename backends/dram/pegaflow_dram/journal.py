"""The pool journal: which sealed block lives in which slot, kept beside a named pool file.

A restarted daemon re-attaches the pool file (its bytes survive the process in shared memory) and
replays this journal to know what the bytes are. Records are appended, never rewritten in place:
``seal`` (a block, its slot and its xxh3-64 checksum, written once the checksum is known) and
``drop`` (the slot no longer holds that block, written before the slot can be reused). Each record
carries its own xxh32, so a record torn by a crash ends the replay there and is cut off; at worst
the last few sealed blocks are forgotten, never misattributed. The journal is compacted (rewritten
from the live set and renamed over) when it grows well past what is live.

File format (little-endian): an 16-byte header ``b"PFJOURN1"`` + the pool's 8-byte identity, then
records ``[u32 payload length][u32 xxh32(payload)][payload]``; payload ``[u8 kind]`` and, for a
seal, ``[u64 offset][u32 nbytes][u64 checksum][encoded BlockKey]``, for a drop ``[u64 offset]``.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import xxhash

from pegaflow_core import BlockKey

log = logging.getLogger("pegaflow.dram.journal")

MAGIC = b"PFJOURN1"
_HEADER = struct.Struct("<8s8s")
_FRAME = struct.Struct("<II")
_SEAL = struct.Struct("<BQIQ")
_DROP = struct.Struct("<BQ")
SEAL, DROP = 1, 2
COMPACT_MIN_BYTES = 8 << 20  # below this a journal is never worth rewriting


@dataclass(frozen=True)
class SealedBlock:
    key: BlockKey
    offset: int
    nbytes: int
    checksum: int


def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), xxhash.xxh32_intdigest(payload)) + payload


class Journal:
    """Append-only journal of one pool. Not thread-safe: the tier calls it under its lock."""

    def __init__(self, path: Path, identity: bytes, fd: int, live: int) -> None:
        self.path = path
        self.identity = identity
        self._fd = fd
        self._size = os.fstat(fd).st_size
        self._records = live  # records in the file
        self._live = live  # seal records not cancelled by a drop

    @classmethod
    def open(cls, path: Path, identity: bytes, replay: bool) -> tuple[Journal, list[SealedBlock]]:
        """Open (or start) the journal of the pool with ``identity``. With ``replay`` return the
        blocks it says are sealed; without it, or for another pool's journal, start empty."""
        live: dict[int, SealedBlock] = {}
        if replay and path.exists():
            live = cls._replay(path, identity)
        journal = cls._rewrite(path, identity, live.values())
        return journal, list(live.values())

    @staticmethod
    def _replay(path: Path, identity: bytes) -> dict[int, SealedBlock]:
        data = path.read_bytes()
        if len(data) < _HEADER.size:
            log.warning("journal %s is too short to be one; the pool starts empty", path)
            return {}
        magic, found = _HEADER.unpack_from(data)
        if magic != MAGIC or found != identity:
            log.warning("journal %s belongs to another pool or format (%r); the pool starts empty", path, magic)
            return {}
        live: dict[int, SealedBlock] = {}
        at = _HEADER.size
        while at + _FRAME.size <= len(data):
            length, digest = _FRAME.unpack_from(data, at)
            payload = data[at + _FRAME.size : at + _FRAME.size + length]
            if len(payload) != length or xxhash.xxh32_intdigest(payload) != digest or not payload:
                log.warning("journal %s: torn or corrupt record at byte %d; replay stops there", path, at)
                break
            at += _FRAME.size + length
            if payload[0] == SEAL and len(payload) > _SEAL.size:
                _, offset, nbytes, checksum = _SEAL.unpack_from(payload)
                try:
                    key = BlockKey.decode(payload[_SEAL.size :])
                except Exception:
                    log.warning("journal %s: undecodable key at byte %d; record skipped", path, at)
                    continue
                live[offset] = SealedBlock(key, offset, nbytes, checksum)
            elif payload[0] == DROP and len(payload) == _DROP.size:
                live.pop(_DROP.unpack(payload)[1], None)
        return live

    @classmethod
    def _rewrite(cls, path: Path, identity: bytes, blocks: Iterable[SealedBlock]) -> Journal:
        """Write a fresh journal holding exactly ``blocks`` and rename it over ``path``."""
        body = bytearray(_HEADER.pack(MAGIC, identity))
        count = 0
        for block in blocks:
            body += _frame(_SEAL.pack(SEAL, block.offset, block.nbytes, block.checksum) + block.key.encode())
            count += 1
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, bytes(body))
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        return cls(path, identity, fd, count)

    def seal(self, blocks: list[SealedBlock]) -> None:
        if not blocks:
            return
        records = b"".join(
            _frame(_SEAL.pack(SEAL, b.offset, b.nbytes, b.checksum) + b.key.encode()) for b in blocks
        )
        self._append(records, len(blocks))
        self._live += len(blocks)

    def drop(self, offsets: list[int]) -> None:
        if offsets:
            self._append(b"".join(_frame(_DROP.pack(DROP, offset)) for offset in offsets), len(offsets))
            self._live -= len(offsets)

    def maybe_compact(self, live: Callable[[], list[SealedBlock]]) -> None:
        """Rewrite from the live set (``live()``, only called when needed) once the file is
        mostly dead records."""
        if self._size > COMPACT_MIN_BYTES and self._records > 4 * max(self._live, 1):
            os.close(self._fd)
            fresh = self._rewrite(self.path, self.identity, live())
            self._fd, self._size, self._records, self._live = fresh._fd, fresh._size, fresh._records, fresh._live

    def _append(self, records: bytes, count: int) -> None:
        os.write(self._fd, records)  # one write per batch; the file is in shared memory
        self._size += len(records)
        self._records += count

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
