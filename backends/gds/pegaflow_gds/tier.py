"""GdsTier: the ssd tier's segment log, with a second data path between the files and GPU memory.

Everything about the files is the ssd tier's (it is a subclass): the directory and superblock, the
record format, rebuild at open, durability, reclaim and compaction, and the host ``put``/``get_into``
path with O_DIRECT. A directory written by one opens with the other (docs/ssd-format.md).

What this class adds is ``read_into_device`` / ``write_from_device`` (the ``device_io`` capability
of pegaflow_core.device_io): a record's payload is 4 KiB-aligned in its segment, so cuFile reads it
straight into the engine's GPU blocks (and writes it from them), one kvikio request per segment of
the block, all of a batch in flight on kvikio's thread pool. Header pages stay on the host path.

Verification: every payload read to the GPU is hashed (xxhash64, see gpu.py) and compared with
the index before the read answers True; a mismatch is counted, logged and dropped from the index,
exactly like a corrupt record on the host path. A write hashes the GPU block the same way to fill
the record header.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pegaflow_core import Availability, BlockKey, InvalidArgument, MemoryKind, TierCapabilities
from pegaflow_core.device_io import DeviceSegments, check_device_segments

from pegaflow_ssd import SsdTier
from pegaflow_ssd.engine import IORequest
from pegaflow_ssd.format import PAGE, pack_header
from pegaflow_ssd.tier import PlannedRecord, _keys

from . import cufile, gpu
from .cufile import DeviceBuffer, GdsUnavailable, IOMode
from .options import GdsOptions

log = logging.getLogger("pegaflow.gds")


class GdsTier(SsdTier):
    """Persistent block store on NVMe files, read and written from GPU memory with cuFile."""

    kind: ClassVar[str] = "gds"
    Options: ClassVar[type] = GdsOptions
    capabilities: ClassVar[TierCapabilities] = TierCapabilities(
        memory=frozenset({MemoryKind.FILE, MemoryKind.GPU}), persistent=True, host_views=False, device_io=True
    )

    def __init__(self, options: GdsOptions) -> None:
        if not isinstance(options, GdsOptions):
            raise InvalidArgument(f"GdsTier: expected GdsTier.Options, got {type(options).__name__}")
        self._handles: dict[Path, Any] = {}
        self._handles_lock = threading.Lock()
        self._mode: IOMode | None = None
        super().__init__(options)
        self.options: GdsOptions = options

    # -- how device I/O runs ----------------------------------------------------------------------
    def device_mode(self) -> IOMode:
        """kvikio configured with this tier's ``compat``/``threads`` (once); GdsUnavailable says why
        device I/O cannot run here (no GPU driver, kvikio missing, ``compat: off`` without GDS)."""
        if self._mode is None:
            self._mode = cufile.configure(self.options.compat, self.options.threads)
            log.info("gds tier over %s: device I/O by %s", self.path, self._mode.detail)
        return self._mode

    @property
    def direct_loads(self) -> bool:  # type: ignore[override]
        """Whether the daemon should load this tier's hits straight into GPU memory (see
        ``pegaflow_core.device_io.load_route``): ``direct: always``; with ``auto`` only when real
        GDS runs (compat mode reads to GPU slower than O_DIRECT to host plus a pool copy)."""
        if self.options.direct == "never":
            return False
        try:
            mode = self.device_mode()
        except GdsUnavailable:
            return False
        return self.options.direct == "always" or mode.gds

    @classmethod
    def availability(cls) -> Availability:
        mode = cufile.probe()
        if isinstance(mode, GdsUnavailable):
            return Availability(False, str(mode))
        return Availability(True, f"{mode.detail}; direct: auto loads {'straight to GPU' if mode.gds else 'through DRAM'}")

    @classmethod
    def conformance_options(cls, tmp_path: Path, capacity_bytes: int | None = None) -> GdsOptions:
        base = SsdTier.conformance_options(tmp_path, capacity_bytes)
        return GdsOptions(path=str(Path(tmp_path) / "gds"), capacity=base.capacity, segment_size=base.segment_size,
                          queue_depth=base.queue_depth, fsync=False, threads=4)

    # -- device_io ------------------------------------------------------------------------------
    def read_into_device(self, keys: Sequence[BlockKey], dests: Sequence[DeviceSegments]) -> list[bool]:
        keys = _keys(keys)
        batch = check_device_segments(dests, len(keys), "dests")
        results = [False] * len(keys)
        if not keys:
            return results
        self.device_mode()
        ordinals = gpu.device_of(batch, "dests")
        sizes = [sum(n for _, n in segments) for segments in batch]
        with self.reading_records(keys, sizes) as reading:
            if not reading:
                return results
            pending: list[tuple[int, int, Any]] = []
            errors: dict[int, str] = {}
            try:
                for i, rec in reading:
                    handle = self._handle(rec.path)
                    offset = rec.payload_offset
                    for address, nbytes in batch[i]:
                        pending.append((i, nbytes, handle.pread(DeviceBuffer(address, nbytes), size=nbytes, file_offset=offset)))
                        offset += nbytes
            finally:  # never leave while kvikio still writes into the caller's GPU memory
                for i, nbytes, future in pending:
                    _wait(future, nbytes, i, errors)
            gpu.synchronize([o for i, _ in reading for o in ordinals[i]])
            scratch = np.empty(max(sizes), dtype=np.uint8)
            for i, rec in reading:
                if i in errors:
                    self.reject_record(rec, f"read to GPU failed: {errors[i]}")
                    continue
                if gpu.device_xxh64(batch[i], ordinals[i], scratch) != rec.phash:
                    self.reject_record(rec, "payload xxhash64 mismatch (read to GPU)")
                    continue
                results[i] = True
        return results

    def write_from_device(self, keys: Sequence[BlockKey], sources: Sequence[DeviceSegments]) -> list[bool]:
        keys = _keys(keys)
        batch = check_device_segments(sources, len(keys), "sources")
        if not keys:
            return []
        self.device_mode()
        ordinals = gpu.device_of(batch, "sources")
        sizes = [sum(n for _, n in segments) for segments in batch]

        def write(plans: list[PlannedRecord]) -> None:
            self._write_records(plans, batch, ordinals)

        return self.append_records(keys, sizes, write, what="sources")

    def _write_records(self, plans: list[PlannedRecord], batch: list[list[tuple[int, int]]],
                       ordinals: list[list[int]]) -> None:
        """Payloads from GPU memory through kvikio, header pages through the O_DIRECT engine
        (both in flight together); a record with any failed piece is not ok."""
        scratch = np.empty(max(p.payload_len for p in plans), dtype=np.uint8)
        pending: list[tuple[PlannedRecord, int, Any]] = []
        errors: dict[int, str] = {}
        try:
            for plan in plans:
                segments = batch[plan.source]
                plan.phash = gpu.device_xxh64(segments, ordinals[plan.source], scratch)
                handle = self._handle(plan.path)
                offset = plan.payload_offset
                for address, nbytes in segments:
                    pending.append((plan, nbytes, handle.pwrite(DeviceBuffer(address, nbytes), size=nbytes, file_offset=offset)))
                    offset += nbytes
        except BaseException:
            for plan, nbytes, future in pending:
                _wait(future, nbytes, id(plan), errors)
            raise

        def header(plan: PlannedRecord) -> IORequest:
            def fill(buf: memoryview) -> None:
                assert plan.phash is not None
                pack_header(buf, plan.key_bytes, plan.seq, plan.payload_len, plan.phash)

            def done(buf: memoryview, error: OSError | None) -> None:
                if error is not None:
                    log.error("gds tier: header write to %s at %d failed: %s", plan.path, plan.offset, error)
                    plan.ok = False

            return IORequest(plan.fd, plan.offset, PAGE, True, done, fill)

        try:
            self.engine.run(header(plan) for plan in plans)
        finally:
            for plan, nbytes, future in pending:
                _wait(future, nbytes, id(plan), errors)
        for plan in plans:
            if id(plan) in errors:
                log.error("gds tier: payload write from GPU to %s at %d failed: %s", plan.path, plan.offset, errors[id(plan)])
                plan.ok = False

    # -- kvikio file handles --------------------------------------------------------------------
    def _handle(self, path: Path) -> Any:
        """One kvikio handle per segment file, opened at first use (the segment is pinned by the
        caller, so its file exists and is not deleted meanwhile)."""
        with self._handles_lock:
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = cufile.kvikio().CuFile(path, "r+")
            return handle

    def _segment_closing(self, path: Path) -> None:
        with self._handles_lock:
            handle = self._handles.pop(path, None)
        if handle is not None:
            handle.close()

    def close(self) -> None:
        super().close()
        with self._handles_lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            handle.close()


def _wait(future: Any, nbytes: int, key: int, errors: dict[int, str]) -> None:
    """Wait for one kvikio future; a failure or a short transfer is recorded under ``key``."""
    try:
        done = int(future.get())
    except Exception as exc:  # kvikio reports I/O and CUDA failures as RuntimeError
        errors.setdefault(key, str(exc))
        return
    if done != nbytes:
        errors.setdefault(key, f"short transfer: {done} of {nbytes} bytes")
