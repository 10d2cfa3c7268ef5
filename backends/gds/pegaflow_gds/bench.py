"""``pegaflow bench gds``: GPU <-> file GB/s of the gds tier (and of raw kvikio), against O_DIRECT
to host memory on the same file system (fio, or a plain loop where fio is missing) and against the
ssd tier's host path (with and without the host -> GPU copy that the staged route adds), all in one
run, alternating, medians reported. Reads are cold: page cache pages of the files are dropped
after the writes (compat mode reads through the page cache otherwise).

Needs a GPU, torch with CUDA (for the GPU buffers) and kvikio."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pegaflow_core.sizes import Size, format_size, parse_size

MIB = 1 << 20
SEGMENT = 256 * MIB


class GdsBenchmark:
    kind = "gds"
    help = "gds tier GPU<->file GB/s vs O_DIRECT to host (fio) and the ssd tier's host path, same file system"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", default="/var/tmp", help="directory on the file system to test (default %(default)s)")
        p.add_argument("--size", default="1gb", help="bytes written and read per run (default %(default)s)")
        p.add_argument("--block", default="2mb", help="block size (default %(default)s)")
        p.add_argument("--batch", type=int, default=64, help="blocks per call (default %(default)s)")
        p.add_argument("--queue-depth", type=int, default=32, help="O_DIRECT I/Os in flight (default %(default)s)")
        p.add_argument("--threads", type=int, default=16, help="kvikio threads (default %(default)s)")
        p.add_argument("--compat", choices=("auto", "on", "off"), default="auto", help="kvikio compat mode")
        p.add_argument("--no-fsync", action="store_true", help="tiers without fdatasync per batch")
        p.add_argument("--repeat", type=int, default=3, help="alternating runs (default %(default)s)")

    @staticmethod
    def run(args: argparse.Namespace) -> dict[str, Any]:
        from pegaflow_ssd.bench import _fio_run, _plain_run

        from . import cufile

        mode = cufile.probe()
        if isinstance(mode, cufile.GdsUnavailable):
            raise SystemExit(f"bench gds: {mode}")
        try:
            import torch
        except ImportError:
            raise SystemExit("bench gds: needs torch with CUDA (the GPU buffers are torch tensors)") from None
        if not torch.cuda.is_available():
            raise SystemExit("bench gds: torch sees no CUDA device (the GPU buffers are torch tensors)")
        size, block = parse_size(args.size), parse_size(args.block)
        count = max(1, size // block)
        size = count * block
        gpu = torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()  # kvikio copies on its own streams: the buffer must be ready
        work = Path(tempfile.mkdtemp(prefix="pegaflow-gds-bench-", dir=args.dir))
        fio = shutil.which("fio")  # never installed here: GPU test machines are often offline
        runs: dict[str, list[float]] = {}

        def add(name: str, value: float) -> None:
            runs.setdefault(name, []).append(value)

        detail = ""
        try:
            for _ in range(max(1, args.repeat)):
                w, r, detail = _gds_run(work / "gds", args, gpu, count, block)
                add("gds_write", w)
                add("gds_read", r)
                w, r = _kvikio_run(work / "raw.dat", args, gpu, count, block)
                add("kvikio_write", w)
                add("kvikio_read", r)
                w, r, staged = _ssd_run(work / "ssd", args, gpu, count, block)
                add("ssd_write", w)
                add("ssd_read", r)
                add("ssd_read_plus_h2d", staged)
                w, r = (_fio_run(fio, work / "fio.dat", args, size, block) if fio
                        else _plain_run(work / "plain.dat", args, size, block))
                add("odirect_write", w)
                add("odirect_read", r)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in runs.items()}
        label = "fio (O_DIRECT, io_uring)" if fio else "plain O_DIRECT pwritev/preadv loop (fio not found)"
        return {
            "bench": "gds",
            "description": f"{count} blocks of {format_size(block)} ({format_size(size)}) in {args.dir}; "
                           f"device I/O: {detail}; fsync: {not args.no_fsync}; cold reads; median of {args.repeat}",
            "figures": {**{f"{k}_GBps": v for k, v in med.items()},
                        **{f"{k}_runs": ", ".join(f"{x:.2f}" for x in v) for k, v in runs.items()}},
            "baseline": {"tool": label, "write_GBps": med["odirect_write"], "read_GBps": med["odirect_read"]},
            "ratios": {
                "gds_write_vs_odirect": med["gds_write"] / med["odirect_write"],
                "gds_read_vs_odirect": med["gds_read"] / med["odirect_read"],
                "gds_read_vs_staged_route": med["gds_read"] / med["ssd_read_plus_h2d"],
                "gds_read_vs_raw_kvikio": med["gds_read"] / med["kvikio_read"],
            },
        }


def _timed(fn: Callable[[], None], nbytes: int) -> float:
    start = time.perf_counter()
    fn()
    return nbytes / (time.perf_counter() - start) / 1e9


def _drop_cache(paths: list[Path]) -> None:
    """Make the next read cold: the files' clean pages leave the page cache."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _gds_run(path: Path, args: argparse.Namespace, gpu: Any, count: int, block: int) -> tuple[float, float, str]:
    from pegaflow_core import BlockKey

    from .options import GdsOptions
    from .tier import GdsTier

    shutil.rmtree(path, ignore_errors=True)
    tier = GdsTier(GdsOptions(path=str(path), capacity=Size((count * (block + 8192) // SEGMENT + 3) * SEGMENT),
                              segment_size=Size(SEGMENT), queue_depth=args.queue_depth, fsync=not args.no_fsync,
                              compat=args.compat, threads=args.threads))
    try:
        keys = BlockKey.many("bench/gds", [i.to_bytes(8, "little") for i in range(count)])
        base = gpu.data_ptr()
        segs = [[(base + i * block, block)] for i in range(count)]

        def write() -> None:
            for lo in range(0, count, args.batch):
                if not all(tier.write_from_device(keys[lo : lo + args.batch], segs[lo : lo + args.batch])):
                    raise RuntimeError(f"the gds tier in {path} refused blocks; is the disk full?")

        def read() -> None:
            for lo in range(0, count, args.batch):
                if not all(tier.read_into_device(keys[lo : lo + args.batch], segs[lo : lo + args.batch])):
                    raise RuntimeError("the gds tier missed blocks it had just stored")

        w = _timed(write, count * block)
        _drop_cache(sorted(path.glob("seg-*.dat")))
        r = _timed(read, count * block)
        return w, r, tier.device_mode().detail
    finally:
        tier.close()
        shutil.rmtree(path, ignore_errors=True)


def _kvikio_run(path: Path, args: argparse.Namespace, gpu: Any, count: int, block: int) -> tuple[float, float]:
    """Raw kvikio on one file, one request per block, a batch in flight: the ceiling the tier's
    device path can reach (it adds headers, hashing and bookkeeping)."""
    from . import cufile

    kv = cufile.kvikio()
    cufile.configure(args.compat, args.threads)
    handle = kv.CuFile(path, "w+")
    base = gpu.data_ptr()

    def run(write: bool) -> None:
        for lo in range(0, count, args.batch):
            futures = []
            for i in range(lo, min(count, lo + args.batch)):
                buf = cufile.DeviceBuffer(base + i * block, block)
                op = handle.pwrite if write else handle.pread
                futures.append(op(buf, size=block, file_offset=i * block))
            for future in futures:
                future.get()
        if write and not args.no_fsync:
            os.fdatasync(handle.fileno())

    try:
        w = _timed(lambda: run(True), count * block)
        _drop_cache([path])
        r = _timed(lambda: run(False), count * block)
    finally:
        handle.close()
        path.unlink(missing_ok=True)
    return w, r


def _ssd_run(path: Path, args: argparse.Namespace, gpu: Any, count: int, block: int) -> tuple[float, float, float]:
    """The ssd tier's host path (put/get_into with pinned host buffers), and the staged route's
    read: get_into pinned memory, then one host -> GPU copy per batch."""
    import torch

    from pegaflow_core import BlockKey
    from pegaflow_ssd import SsdOptions, SsdTier

    shutil.rmtree(path, ignore_errors=True)
    tier = SsdTier(SsdOptions(path=str(path), capacity=Size((count * (block + 8192) // SEGMENT + 3) * SEGMENT),
                              segment_size=Size(SEGMENT), queue_depth=args.queue_depth, fsync=not args.no_fsync))
    batch = min(count, args.batch)
    pinned = torch.empty(batch * block, dtype=torch.uint8, pin_memory=True)
    views = [pinned[i * block : (i + 1) * block].numpy() for i in range(batch)]
    try:
        keys = BlockKey.many("bench/ssd", [i.to_bytes(8, "little") for i in range(count)])
        pinned.copy_(gpu[: batch * block])

        def write() -> None:
            for lo in range(0, count, batch):
                if not all(tier.put(keys[lo : lo + batch], views[: len(keys[lo : lo + batch])])):
                    raise RuntimeError(f"the ssd tier in {path} refused blocks; is the disk full?")

        def read(to_gpu: bool) -> None:
            for lo in range(0, count, batch):
                n = len(keys[lo : lo + batch])
                if not all(tier.get_into(keys[lo : lo + batch], views[:n])):
                    raise RuntimeError("the ssd tier missed blocks it had just stored")
                if to_gpu:  # pinned is reused by the next batch: the copy must finish first
                    gpu[lo * block : (lo + n) * block].copy_(pinned[: n * block])
            torch.cuda.synchronize()

        w = _timed(write, count * block)
        _drop_cache(sorted(path.glob("seg-*.dat")))
        r = _timed(lambda: read(False), count * block)
        _drop_cache(sorted(path.glob("seg-*.dat")))
        staged = _timed(lambda: read(True), count * block)
        return w, r, staged
    finally:
        tier.close()
        shutil.rmtree(path, ignore_errors=True)
