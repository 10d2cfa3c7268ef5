"""``pegaflow bench remote``: blocks saved on node a, loaded by an engine on node b through b's
remote tier (Pin on a, one batched transport read into b's pool, checksum check, copy into the
engine), timed against the raw transport moving the same blocks between two processes in the
same run. Both daemons, the engines and redis-server run on this machine, on loopback."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

from .client import PegaflowClient
from .launcher import DaemonProcess
from .sim_engine import LLAMA_8B, SimulatedEngine

OWNER = textwrap.dedent(
    """
    import sys, numpy as np
    from pegaflow_core.plugins import get_registry
    cls = get_registry().get("transport", sys.argv[1])
    transport = cls(cls.Options())
    region = np.ones(int(sys.argv[2]), dtype=np.uint8)
    registered = transport.register(region)
    print(transport.address, registered.descriptor.hex(), flush=True)
    sys.stdin.read()
    """
)


def raw_transport_gbps(kind: str, blocks: int, block_bytes: int, rounds: int) -> float:
    """The same reads with the bare transport between this process and an owner process."""
    import numpy as np

    from .plugins import get_registry
    from .transport import RemoteRegion, TransferOp

    nbytes = blocks * block_bytes
    owner = subprocess.Popen([sys.executable, "-c", OWNER, kind, str(nbytes)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        address, descriptor = owner.stdout.readline().split()
        cls = get_registry().get("transport", kind)
        transport = cls(cls.Options())
        local = np.zeros(nbytes, dtype=np.uint8)
        region = transport.register(local)
        remote = RemoteRegion(address, bytes.fromhex(descriptor))
        ops = [TransferOp(region, i * block_bytes, remote, i * block_bytes, block_bytes) for i in range(blocks)]
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            transport.read(ops, timeout_s=60).result()
            times.append(time.perf_counter() - started)
        transport.close()
        return nbytes / statistics.median(times) / 1e9
    finally:
        owner.kill()
        owner.wait()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pegaflow_redis.testing import RedisServer

    if shutil.which("redis-server") is None:
        raise SystemExit("pegaflow bench remote needs redis-server on PATH (apt-get install redis-server)")
    shape = dataclasses.replace(LLAMA_8B, num_blocks=2 * args.blocks)
    nbytes = args.blocks * shape.block_bytes
    with tempfile.TemporaryDirectory(prefix="pegaflow-bench-remote-") as tmp:
        redis = RedisServer(Path(tmp) / "redis")
        redis.start()
        try:
            prefix = f"bench{uuid.uuid4().hex[:8]}"
            pool = max(2 * nbytes * (args.rounds + 1), 256 << 20)

            def config(node: str) -> str:
                return (f"server: {{node: {node}}}\nindex: {{kind: redis, url: '{redis.url}', node: {node}, key_prefix: {prefix}}}\n"
                        f"transport: {{kind: {args.transport}}}\ntiers:\n  - {{kind: dram, capacity: {pool}, pool_name: bench-{node}, shm_dir: '{tmp}'}}\n"
                        "  - {kind: remote, timeout: 60s}\n")

            with DaemonProcess(config("a")) as a, DaemonProcess(config("b")) as b, \
                    PegaflowClient(a.endpoint, timeout_s=120) as on_a, PegaflowClient(b.endpoint, timeout_s=120) as on_b:
                on_a.wait_warm()
                on_b.wait_warm()
                saver = SimulatedEngine(on_a, shape, fill=False, instance_id="a0")
                loader = SimulatedEngine(on_b, shape, fill=False, instance_id="b0")
                saver.cache.array[:] = 5
                times = []
                for r in range(args.rounds):
                    hashes = [f"remote-{r}-{i}".encode().ljust(32, b".") for i in range(args.blocks)]
                    on_a.save(saver.handle, saver.allocate(args.blocks), hashes)
                    time.sleep(0.2)  # sealing and publishing are asynchronous
                    started = time.perf_counter()
                    hit = on_b.query(loader.handle, hashes)
                    result = on_b.load(loader.handle, hit.lease_id, loader.allocate(hit.hit_blocks)).wait()
                    times.append(time.perf_counter() - started)
                    if hit.hit_blocks != args.blocks or result.failed_block_ids:
                        raise SystemExit(f"round {r}: {hit.hit_blocks} hits, {len(result.failed_block_ids)} failed of {args.blocks}")
                saver.close()
                loader.close()
        finally:
            redis.stop()
    remote = nbytes / statistics.median(times) / 1e9
    raw = raw_transport_gbps(args.transport, args.blocks, shape.block_bytes, args.rounds)
    return {
        "bench": "remote",
        "description": f"{args.blocks} blocks x {shape.block_bytes >> 10} KiB = {nbytes / 1e9:.2f} GB per round from node a "
                       f"to an engine on node b over '{args.transport}' (query, pin, fetch, verify, copy into the engine)",
        "figures": {"remote_fetch_gbps": remote, "remote_fetch_s_p50": statistics.median(times)},
        "baseline": {"raw_transport_gbps": raw},
        "ratios": {"remote_vs_raw_transport": remote / raw},
    }
