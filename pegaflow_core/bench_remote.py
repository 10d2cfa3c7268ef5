"""``pegaflow bench remote``: blocks saved on node a, fetched by node b's remote tier (cluster
index lookup, Pin on a, one transport read into b's pool with each block's checksum checked as
it lands) and loaded by an engine on b.

Two figures, both against the baseline: the fetch alone (one Query that waits until the blocks
are b's own hits) and the engine's path (Query + Load, which adds the copy into the engine's
blocks). The baseline is the bare transport moving the same blocks between the same two daemons
(the ``ProbeRemote`` RPC: one read of the same blocks, same count and bytes, from a's pool into
scratch slots of b's pool, both in /dev/shm, over the same transport endpoints, nothing else),
measured after every round; a bare transport between two fresh processes is printed too. Both
daemons, the engines and redis-server run on this machine, on loopback."""

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

from .client import PegaflowClient, QueryResult
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
    """The same reads with the bare transport between this process and a fresh owner process
    (no daemon around either end)."""
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


WAIT_S = 60.0  # a Query waits in the daemon this long at most for blocks being fetched
SHM_DIR = "/dev/shm"  # the pools must be memory: a pool file on a disk spends the run in writeback


def _fetch(client: PegaflowClient, engine: SimulatedEngine, hashes: list[bytes]) -> QueryResult:
    """One Query that waits in node b (``wait_s``) until its remote tier has fetched the blocks
    into b's pool: it answers once they are b's own hits, without polls that would add their
    interval and compete with the transfer for the CPU."""
    hit = client.query(engine.handle, hashes, wait_s=WAIT_S)
    if hit.loading:
        raise SystemExit(f"node b was still fetching after {WAIT_S:g} s")
    return hit


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pegaflow_redis.testing import RedisServer

    if shutil.which("redis-server") is None:
        raise SystemExit("pegaflow bench remote needs redis-server on PATH (apt-get install redis-server)")
    shape = dataclasses.replace(LLAMA_8B, num_blocks=2 * args.blocks)
    nbytes = args.blocks * shape.block_bytes
    fetch_s, load_s, raw_s = [], [], []
    shm = SHM_DIR if Path(SHM_DIR).is_dir() else None
    with tempfile.TemporaryDirectory(prefix="pegaflow-bench-remote-") as tmp, \
            tempfile.TemporaryDirectory(prefix="pegaflow-bench-remote-", dir=shm) as pools:
        redis = RedisServer(Path(tmp) / "redis")
        redis.start()
        try:
            prefix = f"bench{uuid.uuid4().hex[:8]}"
            pool = max(4 * nbytes, 256 << 20)  # older rounds are evicted (LRU)

            def config(node: str) -> str:
                return (f"server: {{node: {node}}}\nindex: {{kind: redis, url: '{redis.url}', node: {node}, key_prefix: {prefix}}}\n"
                        f"transport: {{kind: {args.transport}}}\ntiers:\n  - {{kind: dram, capacity: {pool}, pool_name: bench-{node}, shm_dir: '{pools}'}}\n"
                        f"  - {{kind: remote, timeout: 60s, verify: {str(not args.no_verify).lower()}}}\n")

            with DaemonProcess(config("a")) as a, DaemonProcess(config("b")) as b, \
                    PegaflowClient(a.endpoint, timeout_s=120) as on_a, PegaflowClient(b.endpoint, timeout_s=120) as on_b:
                on_a.wait_warm()
                on_b.wait_warm()
                saver = SimulatedEngine(on_a, shape, fill=False, instance_id="a0")
                loader = SimulatedEngine(on_b, shape, fill=False, instance_id="b0")
                saver.cache.array[:] = 5
                for r in range(2 * args.rounds):
                    hashes = [f"remote-{r}-{i}".encode().ljust(32, b".") for i in range(args.blocks)]
                    on_a.save(saver.handle, saver.allocate(args.blocks), hashes)
                    time.sleep(0.2)  # sealing and publishing are asynchronous
                    # Alternate rounds: fetch into b's pool (a Query that waits for it), or the
                    # engine's path (Query, then Load, which waits for the fetch and copies).
                    started = time.perf_counter()
                    if r % 2 == 0:
                        hit = _fetch(on_b, loader, hashes)
                        fetch_s.append(time.perf_counter() - started)
                    else:
                        hit = on_b.query(loader.handle, hashes)
                    result = on_b.load(loader.handle, hit.lease_id, loader.allocate(hit.hit_blocks)).wait()
                    if r % 2:
                        load_s.append(time.perf_counter() - started)
                    if hit.hit_blocks != args.blocks or result.failed_block_ids:
                        raise SystemExit(f"round {r}: {hit.hit_blocks} hits, {len(result.failed_block_ids)} failed of {args.blocks}")
                    moved, seconds = on_b.probe_remote(loader.handle, "a", hashes)  # the same blocks, bare
                    if moved != nbytes:
                        raise SystemExit(f"round {r}: the bare transport moved {moved} of {nbytes} bytes")
                    raw_s.append(seconds)
                saver.close()
                loader.close()
        finally:
            redis.stop()
    fetch = nbytes / statistics.median(fetch_s) / 1e9
    end_to_end = nbytes / statistics.median(load_s) / 1e9
    raw = nbytes / statistics.median(raw_s) / 1e9
    # best of the same number of rounds on each side (the bare reads after the fetches): a
    # minimum over more rounds would favour the baseline
    fetch_best, raw_best = nbytes / min(fetch_s) / 1e9, nbytes / min(raw_s[::2]) / 1e9
    fresh = raw_transport_gbps(args.transport, args.blocks, shape.block_bytes, args.rounds)
    return {
        "bench": "remote",
        "description": f"{args.blocks} blocks x {shape.block_bytes >> 10} KiB = {nbytes / 1e9:.2f} GB per round from node a "
                       f"to node b over '{args.transport}'{' (verification off)' if args.no_verify else ''}: the remote tier's "
                       "fetch into b's pool (one Query waiting for it) and the engine's Query + Load, vs the bare transport "
                       "moving the same blocks between the same two daemons",
        "figures": {"remote_fetch_gbps": fetch, "remote_fetch_s_p50": statistics.median(fetch_s),
                    "remote_fetch_gbps_best": fetch_best,
                    "query_load_gbps": end_to_end, "query_load_s_p50": statistics.median(load_s)},
        "baseline": {"raw_transport_gbps": raw, "raw_transport_gbps_best": raw_best,
                     "raw_transport_fresh_processes_gbps": fresh},
        # every round's seconds, in order: the bare read follows each fetch and each Query + Load
        "rounds": {"fetch_s": fetch_s, "query_load_s": load_s, "raw_transport_s": raw_s},
        "ratios": {"remote_fetch_vs_raw_transport": fetch / raw, "query_load_vs_raw_transport": end_to_end / raw,
                   # each fetch against the bare read of the same blocks right after it: on a busy
                   # machine the load drifts between rounds, and a pair sees the same load
                   "remote_fetch_vs_raw_transport_paired": statistics.median(
                       raw_s[2 * k] / f for k, f in enumerate(fetch_s)),
                   # the fastest of each: what the code costs where the machine's noise (which
                   # only ever slows a round down) spared one round of each
                   "remote_fetch_vs_raw_transport_best": fetch_best / raw_best},
    }
