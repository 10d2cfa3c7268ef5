"""``pegaflow bench ...``: benchmarks that print their figures next to a baseline measured in the
same run (``--json`` prints one JSON object: figures, baseline, ratios)."""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable
from typing import Any

BENCHES: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {
    # name: (help, add_arguments, "module:function" run lazily)
}


def _daemon_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=10_000, help="prompt length (default %(default)s)")
    p.add_argument("--iterations", type=int, default=5, help="timed saves and loads (default %(default)s)")
    p.add_argument("--control-rounds", type=int, default=50, help="control-plane RPCs timed for p50/p99")
    p.add_argument("--pool-size", default="4gb", help="daemon DRAM tier capacity (default %(default)s)")


BENCHES["daemon"] = (
    "simulated Llama-3.1-8B engine saving and loading a prompt's KV through a real daemon, vs memcpy",
    _daemon_args,
    "pegaflow_core.bench_daemon:run",
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks with a baseline measured in the same run")
    sub = p.add_subparsers(dest="bench", metavar="BENCH")
    for name, (help_text, add_arguments, target) in BENCHES.items():
        bp = sub.add_parser(name, help=help_text)
        add_arguments(bp)
        bp.add_argument("--json", action="store_true", help="print one JSON object")
        bp.set_defaults(func=_runner(target))
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _runner(target: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        module, _, function = target.partition(":")
        report: dict[str, Any] = getattr(importlib.import_module(module), function)(args)
        report["machine"] = machine()
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_report(report)
        return 0

    return run


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def print_report(report: dict[str, Any]) -> None:
    print(f"bench {report['bench']}: {report.get('description', '')}")
    for section in ("figures", "baseline", "ratios"):
        print(f"  {section}:")
        for key, value in report.get(section, {}).items():
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            print(f"    {key:<32} {shown}")
    m = report["machine"]
    print(f"  machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}")
