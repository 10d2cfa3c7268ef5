"""Built-in plugin: the benchmarks that need nothing but pegaflow-core."""

from __future__ import annotations

import argparse
from typing import Any

from pegaflow_core.hookspecs import hookimpl


class DaemonBenchmark:
    """A simulated Llama-3.1-8B engine saving and loading a prompt's KV through a real daemon,
    against a one-thread memcpy of the same bytes."""

    kind = "daemon"
    help = "simulated Llama-3.1-8B engine saving/loading a prompt's KV through a real daemon, vs memcpy"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tokens", type=int, default=10_000, help="prompt length (default %(default)s)")
        p.add_argument("--iterations", type=int, default=5, help="timed saves and loads (default %(default)s)")
        p.add_argument("--control-rounds", type=int, default=50, help="control-plane RPCs timed for p50/p99")
        p.add_argument("--pool-size", default="4gb", help="daemon DRAM tier capacity (default %(default)s)")
        p.add_argument("--memory", choices=("shm", "cma"), default="shm",
                       help="engine KV in a shared-memory file, or private memory reached by cross-memory attach")
        p.add_argument("--grpc-only", action="store_true",
                       help="control calls over gRPC, not the daemon's local socket (as a client on another machine)")

    @staticmethod
    def run(args: argparse.Namespace) -> dict[str, Any]:
        from pegaflow_core.bench_daemon import run

        return run(args)


class RemoteBenchmark:
    """Remote-tier fetch between two daemons vs the bare transport between the same two daemons."""

    kind = "remote"
    help = "blocks fetched by node b from node a's pool through the remote tier, vs the raw transport"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--blocks", type=int, default=256, help="2 MiB blocks per round (default %(default)s)")
        # Single rounds of the same read move by up to 2x on a busy 2-core machine, more than the
        # gap measured: 15 pairs per run instead of 3 (even so, runs spread; benchmarks.md).
        p.add_argument("--rounds", type=int, default=15, help="timed rounds (default %(default)s)")
        p.add_argument("--transport", default="loopback", help="transport kind (default %(default)s)")
        p.add_argument("--no-verify", action="store_true", help="remote tier with verify: false (trust the transport)")

    @staticmethod
    def run(args: argparse.Namespace) -> dict[str, Any]:
        from pegaflow_core.bench_remote import run

        return run(args)


@hookimpl
def register_benchmarks(register):
    """Register the daemon and remote benchmarks."""
    register(DaemonBenchmark)
    register(RemoteBenchmark)
