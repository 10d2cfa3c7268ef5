"""DramTier: the host-memory tier, and the daemon's embedded default.

Blocks live in slots of one pre-mapped shared-memory pool (``PoolFile``) handed out by a slab
allocator (``SlabAllocator``). A global lock guards only metadata (the key -> slot maps and the
allocator); every copy runs outside it, one ``np.copyto`` per block, which releases the GIL for
large blocks so several daemon threads copy in parallel.

Slot reuse is made safe by a reader count per slot: ``get_into`` counts itself in before it
releases the lock, and an ``evict`` that finds readers only marks the slot dropped; the last reader
frees it. ``view`` hands out memory without counting: its caller holds an index lease, which keeps
the block from being chosen for eviction in the first place.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import numpy as np
import xxhash

from pegaflow_core import (
    Availability,
    BlockKey,
    CapacityError,
    ClosedError,
    ConfigError,
    InvalidArgument,
    MemoryKind,
    SharedPool,
    Tier,
    TierCapabilities,
    TierUsage,
    byte_view,
)
from pegaflow_core.buffers import Buffer, PoolViews
from pegaflow_core.keys import check_keys
from pegaflow_core.checksum import ALGORITHM as CHECKSUM
from pegaflow_core.checksum import checksum
from pegaflow_core.sizes import Size, format_size

from . import numa, pinning
from .journal import Journal, SealedBlock
from .sealer import Sealer
from .pool import PAGE, SlabAllocator
from .options import MIB, DramOptions, is_int, mem_available
from .poolfile import PoolFile, filesystem_of, pool_path, read_header

log = logging.getLogger("pegaflow.dram")

_AUTO_FRACTION = 4  # 'auto' capacity: a quarter of MemAvailable


class _Slot:
    """Where one block lives, and who is still reading it."""

    __slots__ = ("offset", "nbytes", "readers", "dropped", "checksum", "known", "verified")

    def __init__(self, offset: int, nbytes: int, checksum: int | None = None, verified: bool = True,
                 known: int | None = None) -> None:
        self.offset = offset
        self.nbytes = nbytes
        self.readers = 0
        self.dropped = False  # evicted while read: the last reader frees it
        self.checksum = checksum  # the checksum of the bytes once sealed (journaled, when there is a journal)
        self.known = known  # given at commit, verified by the caller: sealing records it without hashing
        self.verified = verified  # False for blocks recovered from a journal until first checked


def _same_length(keys: list[BlockKey], buffers: Sequence[Buffer], what: str) -> None:
    if len(keys) != len(buffers):
        raise InvalidArgument(f"{what}: expected one buffer per key ({len(keys)}), got {len(buffers)}")


class DramTier(Tier):
    """Host-memory tier over one shared-memory pool; see the module docstring for the design."""

    kind: ClassVar[str] = "dram"
    Options: ClassVar[type] = DramOptions
    capabilities: ClassVar[TierCapabilities] = TierCapabilities(
        memory=frozenset({MemoryKind.HOST}), persistent=False, host_views=True
    )

    def __init__(self, options: DramOptions | None = None) -> None:
        options = options if options is not None else DramOptions()
        if not isinstance(options, DramOptions):
            raise InvalidArgument(f"DramTier: expected DramTier.Options, got {type(options).__name__}")
        self.options = options
        chunks = self._chunks(options)
        node, numa_note = self._numa(options)
        self._pool = PoolFile.open(
            options.shm_dir,
            options.pool_name,
            options.chunk,
            chunks,
            hugepages=options.hugepages,
            populate=options.populate,
            numa_node=node,
            numa_strict=options.numa != "auto",
        )
        self._pinned: list[pinning.Pinned] = []  # chunk 0 at start, the rest as the warm-up pins them
        try:
            pin_note = self._pin(options.pin)
        except BaseException:
            self._pool.close()
            raise
        if self._pinned:
            # An instance attribute shadows the class default: only this pool is pinned.
            self.capabilities = TierCapabilities(
                memory=frozenset({MemoryKind.HOST, MemoryKind.PINNED_HOST}), persistent=False, host_views=True
            )
        warm_up = options.populate or bool(self._pinned)
        self._alloc = SlabAllocator(options.chunk, chunks, ready=not warm_up)
        if self._pinned:
            self._alloc.mark_ready(0)
        self._array: np.ndarray = self._pool.array
        self._data: memoryview = self._pool.data
        self._read_only = self._data.toreadonly()  # views handed to readers are slices of it
        self._base = self._pool.address  # views carry base + offset (PoolViews)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stored: dict[BlockKey, _Slot] = {}
        self._reserved: dict[BlockKey, tuple[int, int]] = {}  # (offset, nbytes): a _Slot once committed
        self._used_bytes = 0
        self._copying = 0  # operations copying outside the lock; close waits for them
        self._closed = False
        self.integrity_failures = 0
        self._recovered: list[tuple[BlockKey, int]] = []
        self._journal: Journal | None = None
        self._sealer: Sealer | None = None
        if options.pool_name is not None:
            self.capabilities = TierCapabilities(
                memory=self.capabilities.memory, persistent=True, host_views=True
            )
            try:
                self._open_journal(options.recover and self._pool.reattached)
            except BaseException:
                self._pool.close()
                raise
        if self._journal is not None or options.verify == "always":
            self._sealer = Sealer(self._seal_batch)
        self._prefaulter: threading.Thread | None = None
        if warm_up:
            self._prefaulter = threading.Thread(target=self._prefault, args=(chunks,), name="pegaflow-dram-prefault", daemon=True)
            self._prefaulter.start()
        log.info(
            "dram tier: %s in %s (%d chunks of %s; %s; %s%s)",
            format_size(chunks * options.chunk),
            self._pool.path,
            chunks,
            format_size(options.chunk),
            pin_note,
            numa_note,
            f"; {self._pool.detail}" if self._pool.detail else "",
        )

    # -- start-up -------------------------------------------------------------------------------
    def _prefault(self, chunks: int) -> None:
        """Fault the pool in (and pin it for the GPU) chunk by chunk on a few threads, handing each
        chunk to the allocator when it is done, so the daemon serves from the first chunks at once
        whatever the pool size (a fresh 4 GiB pool took 23 s to fault in on the CI machine; the
        reference pins 16 GB for 13 s before it answers)."""
        started = time.monotonic()
        first = 1 if self._pinned else 0  # chunk 0 was pinned (and so faulted in) at start
        failed: list[int] = []

        def warm(index: int) -> None:
            if self._closed or failed:
                return
            try:
                if self.options.populate:
                    self._pool.populate_chunk(index)
                if self._pinned:
                    self._pin_chunk(index)
            except (OSError, RuntimeError) as exc:
                log.error("dram tier: could not %s chunk %d of %s (%s); it is used only when no warm chunk is left",
                          "pin" if isinstance(exc, RuntimeError) else "fault in", index, self._pool.path, exc)
                failed.append(index)
                return
            with self._lock:
                self._alloc.mark_ready(index)

        threads = max(1, min(8, (os.cpu_count() or 1) // 2))
        with ThreadPoolExecutor(threads, thread_name_prefix="pegaflow-dram-warm") as pool:
            list(pool.map(warm, range(first, chunks)))
        if not failed and not self._closed:
            log.info("dram tier: all %d chunks of %s %s after %.1fs", chunks, self._pool.path,
                     "pinned" if self._pinned else "faulted in", time.monotonic() - started)

    def _pin_chunk(self, index: int) -> None:
        pinned = pinning.pin(self._pool.address + index * self.options.chunk, self.options.chunk)
        with self._lock:
            if self._closed:
                pinned.release()
                return
            self._pinned.append(pinned)

    @property
    def warming(self) -> bool:
        """True while the pool is still being faulted in (it already serves meanwhile)."""
        return self._prefaulter is not None and self._prefaulter.is_alive()

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until the whole pool is faulted in (tests and benchmarks that need all of it)."""
        if self._prefaulter is not None:
            self._prefaulter.join(timeout_s)
            return not self._prefaulter.is_alive()
        return True

    # -- warm restart ---------------------------------------------------------------------------
    def _open_journal(self, replay: bool) -> None:
        """Open the journal beside the named pool; with ``replay``, take back the slots of every
        block it says was sealed (they are verified against their checksum on first read)."""
        path = self._pool.path.with_suffix(".journal")
        identity = xxhash.xxh64_digest(repr(self._pool.geometry).encode() + self._pool.path.name.encode() + CHECKSUM)
        self._journal, sealed = Journal.open(path, identity, replay)
        lost = 0
        for block in sealed:
            if block.key in self._stored or not self._alloc.claim(block.offset, block.nbytes):
                lost += 1
                continue
            self._stored[block.key] = _Slot(block.offset, block.nbytes, block.checksum, verified=False)
            self._used_bytes += block.nbytes
            self._recovered.append((block.key, block.nbytes))
        if replay:
            log.info("dram tier: re-attached %s with %d sealed blocks (%s)%s", self._pool.path, len(self._recovered),
                     format_size(self._used_bytes), f"; {lost} journal records did not fit the pool" if lost else "")

    def recovered(self) -> list[tuple[BlockKey, int]]:
        with self._lock:
            return list(self._recovered)

    def _seal_batch(self, keys: list[BlockKey]) -> None:
        """Checksum committed blocks outside the lock (holding reader counts so an eviction
        cannot reuse a slot meanwhile), then journal those still stored. A block committed with
        a checksum its caller verified (a remote fetch) is not hashed again."""
        with self._lock:
            if self._closed:
                return
            pairs = [(k, s) for k in keys if (s := self._stored.get(k)) is not None and s.checksum is None]
            for _, slot in pairs:
                slot.readers += 1
        sums = [checksum(self._data[s.offset : s.offset + s.nbytes]) if s.known is None else s.known for _, s in pairs]
        with self._lock:
            sealed = []
            for (key, slot), digest in zip(pairs, sums):
                self._unread(slot)
                if slot.dropped:
                    continue
                slot.checksum = digest
                sealed.append(SealedBlock(key, slot.offset, slot.nbytes, digest))
            if self._journal is not None:
                self._journal.seal(sealed)
                self._journal.maybe_compact(self._sealed_blocks)

    def _sealed_blocks(self) -> list[SealedBlock]:
        """The live journal content, for compaction (called under the lock)."""
        return [SealedBlock(k, s.offset, s.nbytes, s.checksum) for k, s in self._stored.items() if s.checksum is not None]

    def wait_sealed(self, timeout_s: float = 30.0) -> bool:
        """Block until every block committed so far is sealed (for tests and benchmarks)."""
        return True if self._sealer is None else self._sealer.wait_idle(timeout_s)

    def _verify(self, pairs: list[tuple[BlockKey, _Slot]]) -> list[bool]:
        """Check the bytes of slots that need it (recovered, or ``verify: always``) against their
        checksum, outside the lock; a mismatch evicts the block, counts and logs it. The caller
        holds a reader count on every slot."""
        always = self.options.verify == "always"
        out = []
        for key, slot in pairs:
            if (slot.verified and not always) or slot.checksum is None:
                out.append(True)
                continue
            ok = checksum(self._data[slot.offset : slot.offset + slot.nbytes]) == slot.checksum
            out.append(ok)
            if ok:
                slot.verified = True
                continue
            log.error("dram tier: block %r in %s at offset %d fails its checksum; dropped (the engine recomputes it)",
                      key, self._pool.path, slot.offset)
            with self._lock:
                self.integrity_failures += 1
                if self._stored.get(key) is slot:
                    self._drop(key)
        return out

    def _drop(self, key: BlockKey) -> bool:
        """Forget a stored block (under the lock): journal first, then free or defer the slot."""
        slot = self._stored.pop(key, None)
        if slot is None:
            return False
        self._used_bytes -= slot.nbytes
        if slot.checksum is not None and self._journal is not None:
            self._journal.drop([slot.offset])  # before the slot can be reused
        if slot.readers:
            slot.dropped = True  # the last reader frees it
        else:
            self._alloc.free(slot.offset)
        return True

    # -- construction helpers -----------------------------------------------------------------
    @staticmethod
    def _chunks(options: DramOptions) -> int:
        if options.capacity == "auto":
            existing = DramTier._existing_chunks(options)
            if existing:
                # A named pool keeps its size across restarts: 'auto' measured against memory the
                # old pool itself now occupies would change the geometry and discard the pool.
                return existing
            capacity = mem_available() // _AUTO_FRACTION
            where = f"'auto' (a quarter of MemAvailable, {format_size(capacity)})"
        else:
            capacity = options.capacity
            where = f"{capacity} bytes ({format_size(capacity)})"
        chunks = capacity // options.chunk
        if chunks < 1:
            raise ConfigError(
                f"capacity {where} is smaller than one chunk of {options.chunk} bytes "
                f"({format_size(options.chunk)}); raise capacity or lower chunk",
                path="capacity",
            )
        return chunks

    @staticmethod
    def _existing_chunks(options: DramOptions) -> int:
        """Chunk count of the named pool file already there, if it has this chunk size."""
        if options.pool_name is None or not options.recover:
            return 0
        try:
            with open(pool_path(options.shm_dir, options.pool_name), "rb") as f:
                found = read_header(f.read(4096))
        except OSError:
            return 0
        return found.chunks if found is not None and found.chunk_bytes == options.chunk else 0

    @staticmethod
    def _numa(options: DramOptions) -> tuple[int | None, str]:
        try:
            return numa.resolve(options.numa, options.device)
        except ValueError as exc:
            raise ConfigError(str(exc).removeprefix("numa: "), path="numa") from None

    def _pin(self, mode: str) -> str:
        if mode == "never":
            return "pinning: off"
        if mode == "auto" and not pinning.gpu_present():
            return "pinning: no GPU"
        try:
            self._pin_first_chunk()
        except RuntimeError as exc:
            fstype = filesystem_of(self._pool.path.parent)
            if fstype not in ("tmpfs", "hugetlbfs"):
                # CUDA registers shared file mappings only from memory filesystems.
                exc = RuntimeError(f"{exc} (the pool file is on {fstype or 'an unknown filesystem'}; "
                                   "pinning needs shm_dir on a tmpfs such as /dev/shm, or on hugetlbfs)")
            if mode == "always":
                raise ConfigError(f"'always' but the pool cannot be pinned: {exc}", path="pin") from exc
            log.info("dram tier: pool not pinned (%s); GPU copies will be staged by the driver", exc)
            return f"pinning: failed ({exc})"
        return f"pinned via {self._pinned[0].via} (chunk by chunk in the background)"

    def _pin_first_chunk(self) -> None:
        """Pin chunk 0 now: it proves pinning works here (or fails the start with the reason when
        'always' asks for it) and gives the allocator a pinned chunk before the warm-up starts."""
        self._pinned.append(pinning.pin(self._pool.address, self.options.chunk))

    # -- Backend hooks ------------------------------------------------------------------------
    @classmethod
    def availability(cls) -> Availability:
        default = Path(DramOptions.shm_dir)
        if not default.is_dir():
            return Availability(True, f"{default} is missing: set shm_dir; {pinning.runtime_hint()}")
        nodes = numa.online_nodes()
        numa_note = "one NUMA node" if len(nodes) < 2 else f"{len(nodes)} NUMA nodes"
        return Availability(True, f"shared memory ({default}); {pinning.runtime_hint()}; {numa_note}")

    @classmethod
    def conformance_options(cls, tmp_path: Path, capacity_bytes: int | None = None) -> DramOptions:
        capacity = capacity_bytes if capacity_bytes is not None else 64 * MIB
        chunk = min(MIB, max(PAGE, capacity // PAGE * PAGE))
        return DramOptions(capacity=Size(max(capacity, chunk)), chunk=Size(chunk), shm_dir=str(tmp_path), numa=None)

    # -- Tier: required -----------------------------------------------------------------------
    def put(self, keys: Sequence[BlockKey], blocks: Sequence[Buffer]) -> list[bool]:
        keys = check_keys(keys)
        _same_length(keys, blocks, "blocks")
        sources = [byte_view(block, what=f"blocks[{i}]") for i, block in enumerate(blocks)]
        for i, view in enumerate(sources):
            self._check_fits(len(view), f"blocks[{i}]")
        results = [False] * len(keys)
        first: dict[BlockKey, int] = {}
        writing: list[tuple[int, _Slot]] = []
        with self._lock:
            self._check_open()
            by_size: dict[int, list[int]] = {}
            for i, key in enumerate(keys):
                if key in first:
                    continue
                first[key] = i
                if key in self._stored:
                    results[i] = True
                else:
                    by_size.setdefault(len(sources[i]), []).append(i)
            for nbytes, positions in by_size.items():
                offsets = self._alloc.alloc(nbytes, len(positions))
                writing.extend((i, _Slot(off, nbytes)) for i, off in zip(positions, offsets))
            if writing:
                self._copying += 1
        if writing:
            self._copy_in(writing, sources, keys, results)
        for i, key in enumerate(keys):
            results[i] = results[first[key]]
        return results

    def _copy_in(self, writing: list[tuple[int, _Slot]], sources: list[memoryview], keys: list[BlockKey], results: list[bool]) -> None:
        """Copy outside the lock, then publish. A key someone else stored meanwhile keeps theirs."""
        array = self._array
        try:
            for i, slot in writing:
                np.copyto(array[slot.offset : slot.offset + slot.nbytes], np.frombuffer(sources[i], dtype=np.uint8))
        except BaseException:
            with self._lock:
                for _, slot in writing:
                    self._alloc.free(slot.offset)
                self._done_copying()
            raise
        with self._lock:
            for i, slot in writing:
                if keys[i] in self._stored:
                    self._alloc.free(slot.offset)
                else:
                    self._stored[keys[i]] = slot
                    self._used_bytes += slot.nbytes
                results[i] = True
            self._done_copying()
        if self._sealer is not None:
            self._sealer.submit([keys[i] for i, _ in writing])

    def get_into(self, keys: Sequence[BlockKey], dests: Sequence[Buffer]) -> list[bool]:
        keys = check_keys(keys)
        _same_length(keys, dests, "dests")
        targets = [byte_view(dest, writable=True, what=f"dests[{i}]") for i, dest in enumerate(dests)]
        reading: list[tuple[int, _Slot]] = []
        with self._lock:
            self._check_open()
            for i, key in enumerate(keys):
                slot = self._stored.get(key)
                if slot is None:
                    continue
                if slot.nbytes != len(targets[i]):
                    raise InvalidArgument(
                        f"dests[{i}]: block {key!r} is {slot.nbytes} bytes, the destination is {len(targets[i])} bytes"
                    )
                reading.append((i, slot))
            for _, slot in reading:
                slot.readers += 1
            if reading:
                self._copying += 1
        results = [False] * len(keys)
        array = self._array
        try:
            valid = self._verify([(keys[i], slot) for i, slot in reading]) if self._sealer is not None else None
            for n, (i, slot) in enumerate(reading):
                if valid is not None and not valid[n]:
                    continue
                np.copyto(np.frombuffer(targets[i], dtype=np.uint8), array[slot.offset : slot.offset + slot.nbytes])
                results[i] = True
        finally:
            if reading:
                with self._lock:
                    for _, slot in reading:
                        self._unread(slot)
                    self._done_copying()
        return results

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        keys = check_keys(keys)
        with self._lock:
            self._check_open()
            return [key in self._stored for key in keys]

    def evict(self, keys: Sequence[BlockKey]) -> int:
        keys = check_keys(keys)
        dropped = 0
        with self._lock:
            self._check_open()
            for key in keys:
                dropped += self._drop(key)
        return dropped

    def usage(self) -> TierUsage:
        with self._lock:
            self._check_open()
            return TierUsage(self._alloc.chunks * self._alloc.chunk_bytes, self._used_bytes, len(self._stored))

    def close(self) -> None:
        """Wait for copies in flight, unpin and unmap the pool; unlink it unless it is named.

        Idempotent. Views handed out by ``view``/``reserve``/``buffer`` that are still held keep
        the mapping alive until released; the pool file is unlinked (unnamed) at once regardless.
        """
        with self._lock:
            if self._closed:
                return
        if self._sealer is not None:
            self._sealer.stop()  # seals what is queued, so a clean restart keeps everything
        with self._lock:
            self._closed = True
        if self._prefaulter is not None:
            self._prefaulter.join()
        with self._lock:
            while self._copying:
                self._idle.wait()
            self._stored.clear()
            self._reserved.clear()
            if self._journal is not None:
                self._journal.close()
        for pinned in self._pinned:
            try:
                pinned.release()
            except Exception:
                log.exception("dram tier: cudaHostUnregister failed")
        self._pinned = []
        self._array = np.empty(0, dtype=np.uint8)
        try:
            self._read_only.release()
            self._data.release()
        except BufferError:
            pass  # slices handed out still refer to it; PoolFile.close says so in the log
        self._pool.close()

    # -- Tier: host views ---------------------------------------------------------------------
    def reserve(self, keys: Sequence[BlockKey], nbytes: int) -> PoolViews:
        """Writable slots of ``nbytes`` each, invisible until ``commit``; ``None`` where full.

        A key may have one reservation at a time (a second one raises InvalidArgument). Reserving
        a key that is already stored is allowed; at ``commit`` the stored block is kept."""
        keys = check_keys(keys)
        if not is_int(nbytes):
            raise InvalidArgument(f"nbytes: expected an integer byte count, got {nbytes!r}")
        self._check_fits(nbytes, "nbytes")
        if len(set(keys)) != len(keys):
            raise InvalidArgument("keys: expected distinct keys in one reserve() call, got duplicates")
        with self._lock:
            self._check_open()
            if not self._reserved.keys().isdisjoint(keys):  # one C-level pass; the loop only names the key
                for i, key in enumerate(keys):
                    if key in self._reserved:
                        raise InvalidArgument(f"keys[{i}]: {key!r} is already reserved; commit or abort it first")
            offsets = self._alloc.alloc(nbytes, len(keys))
            views: list[memoryview | None] = [None] * len(keys)
            reserved, data = self._reserved, self._data
            for i, offset in enumerate(offsets):
                reserved[keys[i]] = (offset, nbytes)
                views[i] = data[offset : offset + nbytes]
            addresses = np.zeros(len(keys), dtype=np.uint64)
            addresses[: len(offsets)] = np.asarray(offsets, dtype=np.uint64) + np.uint64(self._base)
            return PoolViews(views, addresses)

    def commit(self, keys: Sequence[BlockKey], checksums: Sequence[int | None] | None = None) -> None:
        """Make reserved blocks visible. A key not reserved raises InvalidArgument, committing none.
        ``checksums``: see ``Tier.commit``; they are what sealing records for those blocks (and
        what ``checksums`` answers meanwhile)."""
        keys = check_keys(keys)
        if checksums is not None and len(checksums) != len(keys):
            raise InvalidArgument(f"checksums: expected one per key ({len(keys)}), got {len(checksums)}")
        with self._lock:
            self._check_open()
            for i, key in enumerate(keys):
                if key not in self._reserved:
                    raise InvalidArgument(f"keys[{i}]: {key!r} has no reservation to commit (reserve it first)")
            fresh = []
            for i, key in enumerate(keys):
                reservation = self._reserved.pop(key, None)
                if reservation is None:  # the same key twice in this batch
                    continue
                offset, nbytes = reservation
                if key in self._stored:
                    self._alloc.free(offset)
                else:
                    self._stored[key] = _Slot(offset, nbytes, known=None if checksums is None else checksums[i])
                    self._used_bytes += nbytes
                    fresh.append(key)
        if self._sealer is not None:
            self._sealer.submit(fresh)

    def abort(self, keys: Sequence[BlockKey]) -> None:
        """Give reserved slots back; keys without a reservation are ignored (abort is cleanup)."""
        keys = check_keys(keys)
        with self._lock:
            self._check_open()
            for key in keys:
                reservation = self._reserved.pop(key, None)
                if reservation is not None:
                    self._alloc.free(reservation[0])

    def view(self, keys: Sequence[BlockKey]) -> PoolViews:
        """Read-only views of stored blocks, valid while the caller's lease keeps them stored."""
        keys = check_keys(keys)
        with self._lock:
            self._check_open()
            slots = [self._stored.get(key) for key in keys]
            check = [(k, s) for k, s in zip(keys, slots) if s is not None and self._sealer is not None
                     and s.checksum is not None and (not s.verified or self.options.verify == "always")]
            for _, slot in check:
                slot.readers += 1
        if check:
            try:
                bad = {id(slot) for (_, slot), ok in zip(check, self._verify(check)) if not ok}
            finally:
                with self._lock:
                    for _, slot in check:
                        self._unread(slot)
            slots = [None if s is not None and id(s) in bad else s for s in slots]
        data = self._read_only
        views = [None if s is None else data[s.offset : s.offset + s.nbytes] for s in slots]
        offsets = np.fromiter((-1 if s is None else s.offset for s in slots), dtype=np.int64, count=len(slots))
        addresses = np.where(offsets < 0, 0, offsets + self._base).astype(np.uint64)
        return PoolViews(views, addresses)

    def checksums(self, keys: Sequence[BlockKey]) -> list[int | None]:
        """The sealed checksum of each stored block, or the verified one it was committed with
        (``None``: missing, or not sealed yet)."""
        keys = check_keys(keys)
        with self._lock:
            self._check_open()
            return [None if (slot := self._stored.get(key)) is None
                    else slot.known if slot.checksum is None else slot.checksum for key in keys]

    # -- pool access for transports --------------------------------------------------------------
    def buffer(self) -> memoryview:
        """The whole pool's data region, writable. Transports (RDMA, UCX) and the daemon's GPU
        copier register it once and address blocks by the offsets ``locate`` gives."""
        with self._lock:
            self._check_open()
            return self._data

    def locate(self, keys: Sequence[BlockKey]) -> list[tuple[int, int] | None]:
        """``(offset, nbytes)`` in ``buffer()`` of each stored block, ``None`` for a miss. Like a
        ``view``, the location stays valid only while a lease keeps the block from eviction."""
        keys = check_keys(keys)
        with self._lock:
            self._check_open()
            out: list[tuple[int, int] | None] = []
            for key in keys:
                slot = self._stored.get(key)
                out.append(None if slot is None else (slot.offset, slot.nbytes))
            return out

    def shared_pool(self) -> SharedPool:
        """The pool file: engines map it to load blocks themselves, within its file permissions."""
        geometry = self._pool.geometry
        return SharedPool(str(self._pool.path), geometry.header_bytes, geometry.data_bytes, geometry.chunk_bytes)

    def ready_offsets(self, keys: Sequence[BlockKey]) -> np.ndarray:
        """Offsets of stored blocks; -1 also for one that ``view`` would verify first (recovered
        from the journal, or ``verify: always``): the daemon's Load verifies it, and this stays a
        dictionary walk cheap enough to answer on the daemon's event loop."""
        keys = check_keys(keys)
        checked = self._sealer is not None
        always = self.options.verify == "always"
        with self._lock:
            self._check_open()
            slots = map(self._stored.get, keys)
            return np.fromiter(
                (-1 if s is None or (checked and s.checksum is not None and (always or not s.verified)) else s.offset
                 for s in slots), dtype=np.int64, count=len(keys))

    @property
    def pool_path(self) -> Path:
        """The pool file (``<shm_dir>/pegaflow-<name>.pool``)."""
        return self._pool.path

    @property
    def pinned(self) -> bool:
        return bool(self._pinned)

    # -- internals ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"dram tier over {self._pool.path} is closed")

    def _check_fits(self, nbytes: int, what: str) -> None:
        """InvalidArgument for an empty block, CapacityError for one larger than a chunk; both
        name the argument, so a caller knows which block of a batch was wrong."""
        if nbytes <= 0:
            raise InvalidArgument(f"{what}: expected a block of at least 1 byte, got {nbytes} bytes")
        try:
            self._alloc.check_fits(nbytes)
        except CapacityError as exc:
            raise CapacityError(f"{what}: {exc}") from None

    def _unread(self, slot: _Slot) -> None:
        """A reader (copy, seal, verification) is done with ``slot``; the last reader of a slot
        evicted meanwhile frees it. Called under the lock."""
        slot.readers -= 1
        if slot.dropped and slot.readers == 0:
            self._alloc.free(slot.offset)

    def _done_copying(self) -> None:
        self._copying -= 1
        if self._copying == 0:
            self._idle.notify_all()
