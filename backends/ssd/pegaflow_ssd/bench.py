"""``pegaflow bench ssd``: the tier's write and read GB/s with large blocks, against ``fio`` with
O_DIRECT on the same file system in the same run (or, without fio, a plain O_DIRECT
pwritev/preadv loop, labelled as such). Disks are noisy, so tier and baseline runs alternate and
the median of each is reported."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pegaflow_core.sizes import Size, format_size, parse_size

MIB = 1 << 20


class SsdBenchmark:
    kind = "ssd"
    help = "ssd tier write/read GB/s with 2 MiB blocks vs fio (O_DIRECT) on the same file system"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", default="/var/tmp", help="directory on the file system to test (default %(default)s)")
        p.add_argument("--size", default="1gb", help="bytes written and read per run (default %(default)s)")
        p.add_argument("--block", default="2mb", help="block size (default %(default)s)")
        p.add_argument("--batch", type=int, default=64, help="blocks per put/get_into call (default %(default)s)")
        p.add_argument("--queue-depth", type=int, default=32, help="I/Os in flight, tier and fio (default %(default)s)")
        p.add_argument("--io", choices=("auto", "io_uring", "threads"), default="auto", help="tier I/O path")
        p.add_argument("--no-fsync", action="store_true", help="tier without fdatasync per batch (fio then skips end_fsync)")
        p.add_argument("--repeat", type=int, default=3, help="alternating tier/baseline runs (default %(default)s)")
        p.add_argument("--rebuild-size", default="1gb",
                       help="bytes of small blocks written before timing a reopen (index rebuild); 0 skips it")
        p.add_argument("--rebuild-block", default="64kb", help="block size of the rebuild test (default %(default)s)")

    @staticmethod
    def run(args: argparse.Namespace) -> dict[str, Any]:
        size, block = parse_size(args.size), parse_size(args.block)
        count = max(1, size // block)
        size = count * block
        work = Path(tempfile.mkdtemp(prefix="pegaflow-ssd-bench-", dir=args.dir))
        fio = find_or_install_fio()
        try:
            runs: dict[str, list[float]] = {"tier_write": [], "tier_read": [], "base_write": [], "base_read": []}
            detail = ""
            for _ in range(max(1, args.repeat)):
                w, r, detail = _tier_run(work / "tier", args, size, block, count)
                runs["tier_write"].append(w)
                runs["tier_read"].append(r)
                if fio:
                    w, r = _fio_run(fio, work / "fio.dat", args, size, block)
                else:
                    w, r = _plain_run(work / "plain.dat", args, size, block)
                runs["base_write"].append(w)
                runs["base_read"].append(r)
            rebuild = _rebuild_run(work / "rebuild", args) if parse_size(args.rebuild_size) else None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in runs.items()}
        label = "fio" if fio else "plain O_DIRECT pwritev/preadv loop (fio not found on PATH)"
        return {
            "bench": "ssd",
            "description": f"{count} blocks of {format_size(block)} ({format_size(size)}) in {args.dir}; "
                           f"tier io: {detail}; fsync: {not args.no_fsync}; median of {args.repeat}",
            "figures": {"tier_write_GBps": med["tier_write"], "tier_read_GBps": med["tier_read"],
                        "tier_write_runs": _fmt(runs["tier_write"]), "tier_read_runs": _fmt(runs["tier_read"]),
                        **(rebuild or {})},
            "baseline": {"tool": label, "write_GBps": med["base_write"], "read_GBps": med["base_read"],
                         "write_runs": _fmt(runs["base_write"]), "read_runs": _fmt(runs["base_read"])},
            "ratios": {"write_vs_baseline": med["tier_write"] / med["base_write"],
                       "read_vs_baseline": med["tier_read"] / med["base_read"]},
        }


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _tier_run(path: Path, args: argparse.Namespace, size: int, block: int, count: int) -> tuple[float, float, str]:
    import numpy as np

    from .options import SsdOptions
    from .tier import SsdTier

    from pegaflow_core import BlockKey

    shutil.rmtree(path, ignore_errors=True)
    segment = 256 * MIB
    capacity = (size // segment + 3) * segment
    tier = SsdTier(SsdOptions(path=str(path), capacity=Size(capacity), segment_size=Size(segment),
                              queue_depth=args.queue_depth, io=args.io, fsync=not args.no_fsync))
    try:
        keys = BlockKey.many("bench/ssd", [i.to_bytes(8, "little") for i in range(count)])
        rng = np.random.default_rng(0)
        blocks = [rng.integers(0, 256, block, dtype=np.uint8) for _ in range(min(count, args.batch))]
        start = time.perf_counter()
        for lo in range(0, count, args.batch):
            batch = keys[lo : lo + args.batch]
            if not all(tier.put(batch, blocks[: len(batch)])):
                raise RuntimeError(f"the tier in {path} refused blocks; is the disk full?")
        write = size / (time.perf_counter() - start) / 1e9
        dests = [np.empty(block, dtype=np.uint8) for _ in range(min(count, args.batch))]
        start = time.perf_counter()
        for lo in range(0, count, args.batch):
            batch = keys[lo : lo + args.batch]
            if not all(tier.get_into(batch, dests[: len(batch)])):
                raise RuntimeError("the tier missed blocks it had just stored")
        read = size / (time.perf_counter() - start) / 1e9
        return write, read, tier.io_detail
    finally:
        tier.close()
        shutil.rmtree(path, ignore_errors=True)


def find_or_install_fio() -> str | None:
    """fio from PATH; where it is missing and this runs as root with apt-get, install Debian's
    package first (said on stderr). None means the labelled O_DIRECT-loop baseline is used."""
    fio = shutil.which("fio")
    if fio or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return fio
    print("bench ssd: fio not found; installing it with apt-get", file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for step in (["apt-get", "install", "-y", "-q", "fio"], ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "fio"]):
        done = subprocess.run(step, capture_output=True, text=True, env=env)
        if step[1] == "install" and done.returncode == 0:
            break
    return shutil.which("fio")


def _fio_run(fio: str, path: Path, args: argparse.Namespace, size: int, block: int) -> tuple[float, float]:
    results = []
    for rw in ("write", "read"):
        cmd = [fio, "--name=pegaflow", f"--filename={path}", f"--rw={rw}", f"--bs={block}", f"--size={size}",
               "--direct=1", "--ioengine=io_uring", f"--iodepth={args.queue_depth}", "--output-format=json"]
        if rw == "write" and not args.no_fsync:
            cmd.append("--end_fsync=1")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:  # fio built without io_uring: libaio is the classic O_DIRECT engine
            cmd[cmd.index("--ioengine=io_uring")] = "--ioengine=libaio"
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        job = json.loads(done.stdout[done.stdout.index("{"):])["jobs"][0][rw]
        results.append(job["io_bytes"] / (job["runtime"] / 1000) / 1e9 if rw == "write" else job["bw_bytes"] / 1e9)
    path.unlink(missing_ok=True)
    return results[0], results[1]


def _plain_run(path: Path, args: argparse.Namespace, size: int, block: int) -> tuple[float, float]:
    """One thread, one aligned buffer, one block at a time: the simplest correct O_DIRECT loop."""
    import mmap

    buf = mmap.mmap(-1, block)
    buf.write(os.urandom(block))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        start = time.perf_counter()
        for off in range(0, size, block):
            os.pwritev(fd, [buf], off)
        if not args.no_fsync:
            os.fdatasync(fd)
        write = size / (time.perf_counter() - start) / 1e9
        start = time.perf_counter()
        for off in range(0, size, block):
            os.preadv(fd, [buf], off)
        read = size / (time.perf_counter() - start) / 1e9
    finally:
        os.close(fd)
        buf.close()
        path.unlink(missing_ok=True)
    return write, read


def _rebuild_run(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Fill a tier with small blocks, close it, and time the reopen: the header-only scan."""
    import numpy as np

    from pegaflow_core import BlockKey

    from .options import SsdOptions
    from .tier import SsdTier

    size, block = parse_size(args.rebuild_size), parse_size(args.rebuild_block)
    count = max(1, size // block)
    segment = 256 * MIB
    opts = SsdOptions(path=str(path), capacity=Size((count * (block + 8192) // segment + 3) * segment),
                      segment_size=Size(segment), queue_depth=args.queue_depth, io=args.io, fsync=False)
    tier = SsdTier(opts)
    try:
        data = np.random.default_rng(1).integers(0, 256, block, dtype=np.uint8)
        keys = BlockKey.many("bench/rebuild", [i.to_bytes(8, "little") for i in range(count)])
        for lo in range(0, count, 512):
            tier.put(keys[lo : lo + 512], [data] * len(keys[lo : lo + 512]))
    finally:
        tier.close()
    start = time.perf_counter()
    tier = SsdTier(opts)
    elapsed = time.perf_counter() - start
    blocks = tier.usage().blocks
    tier.close()
    shutil.rmtree(path, ignore_errors=True)
    return {"rebuild_blocks": blocks, "rebuild_block_bytes": block, "rebuild_s": elapsed}
