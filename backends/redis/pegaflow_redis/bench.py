"""``pegaflow bench redis-index``: latency of one engine step's index calls on the cluster index.

A query is one ``acquire`` of a whole request's keys (625 keys = 10,000 tokens in blocks of 16), so
its latency is what the Redis index adds to time-to-first-token. Baselines measured in the same
run: the in-process ``local`` index on the same keys, and a bare Redis ``PING`` (the network and
server floor every call pays once).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pegaflow_core.errors import PegaflowError
from pegaflow_core.index import Index, Location
from pegaflow_core.keys import BlockKey


class RedisIndexBenchmark:
    """acquire/release/lookup/insert of one request's keys through RedisIndex, vs LocalIndex and PING."""

    kind = "redis-index"
    help = "latency of acquire/lookup/insert of one request's keys on the Redis cluster index"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=None,
                       help="Redis to use (default: start a private redis-server on a free loopback port)")
        p.add_argument("--keys", type=int, default=625, help="keys per call (default %(default)s)")
        p.add_argument("--rounds", type=int, default=200, help="timed calls per operation (default %(default)s)")

    @staticmethod
    def run(args: argparse.Namespace) -> dict[str, Any]:
        with _server(args.url) as url:
            return measure(url, args.keys, args.rounds)


def measure(url: str, nkeys: int, rounds: int) -> dict[str, Any]:
    """Figures in milliseconds. Node "a" publishes the keys; node "b" (the reader) leases them, as
    a daemon loading another node's blocks would."""
    import redis

    from pegaflow_core.default_plugins.local_index import LocalIndex

    from .index import RedisIndex
    from .options import RedisIndexOptions

    prefix = f"bench-{secrets.token_hex(6)}"
    keys = [BlockKey("bench/model", os.urandom(16)) for _ in range(nkeys)]
    entries = [(k, Location("dram", "", 1 << 20, checksum=i)) for i, k in enumerate(keys)]
    a = RedisIndex(RedisIndexOptions(url=url, node="bench-a", key_prefix=prefix))
    b = RedisIndex(RedisIndexOptions(url=url, node="bench-b", key_prefix=prefix))
    local = LocalIndex()
    ping = redis.Redis.from_url(url)
    try:
        a.insert(entries)
        local.insert(entries)
        acquire, release = _acquire_release(b, keys, rounds)
        lookup = _times(lambda: b.lookup(keys), rounds)
        insert = _times(lambda: a.insert(entries), rounds)
        # The minimum is what a call costs on an idle machine; p50 and p99 add whatever else runs.
        figures = {
            f"acquire_{nkeys}_min_ms": min(acquire) * 1e3,
            f"acquire_{nkeys}_p50_ms": _pct(acquire, 50),
            f"acquire_{nkeys}_p99_ms": _pct(acquire, 99),
            "release_min_ms": min(release) * 1e3,
            "release_p50_ms": _pct(release, 50),
            f"lookup_{nkeys}_min_ms": min(lookup) * 1e3,
            f"lookup_{nkeys}_p50_ms": _pct(lookup, 50),
            f"insert_{nkeys}_min_ms": min(insert) * 1e3,
            f"insert_{nkeys}_p50_ms": _pct(insert, 50),
        }
        local_acquire, _ = _acquire_release(local, keys, rounds)
        pings = _times(ping.ping, rounds)
        baseline = {
            f"local_acquire_{nkeys}_min_ms": min(local_acquire) * 1e3,
            f"local_acquire_{nkeys}_p50_ms": _pct(local_acquire, 50),
            "redis_ping_min_ms": min(pings) * 1e3,
            "redis_ping_p50_ms": _pct(pings, 50),
        }
    finally:
        ping.close()
        local.close()
        b.close()
        a.close()
    return {
        "bench": "redis-index",
        "description": f"{nkeys} keys per call, {rounds} rounds, server {url}",
        "figures": figures,
        "baseline": baseline,
        "ratios": {
            "acquire_over_ping": figures[f"acquire_{nkeys}_p50_ms"] / max(baseline["redis_ping_p50_ms"], 1e-9),
            "acquire_over_local": figures[f"acquire_{nkeys}_p50_ms"]
            / max(baseline[f"local_acquire_{nkeys}_p50_ms"], 1e-9),
        },
    }


def _acquire_release(index: Index, keys: list[BlockKey], rounds: int) -> tuple[list[float], list[float]]:
    acquire, release = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        lease = index.acquire(keys, ttl_s=30)
        middle = time.perf_counter()
        index.release(lease.lease_id)
        acquire.append(middle - start)
        release.append(time.perf_counter() - middle)
        if lease.hits != len(keys):
            raise PegaflowError(f"benchmark acquire hit {lease.hits} of {len(keys)} keys; the index lost keys")
    return acquire, release


def _times(call: Callable[[], Any], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def _pct(samples: list[float], pct: int) -> float:
    """Percentile in milliseconds."""
    if pct == 50:
        return statistics.median(samples) * 1e3
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))] * 1e3


@contextmanager
def _server(url: str | None) -> Iterator[str]:
    """``url`` as given, or a private redis-server for the run (no persistence, loopback only)."""
    if url is not None:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise PegaflowError("no --url given and redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="pegaflow-bench-redis-") as workdir:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                        conn.sendall(b"PING\r\n")
                        if conn.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise PegaflowError(f"redis-server on port {port} did not start")
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=10)
