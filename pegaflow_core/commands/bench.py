"""``pegaflow bench <kind>``: benchmarks that print their figures next to a baseline measured in
the same run. ``--json`` prints one JSON object: figures, baseline, ratios, machine.

Benchmarks are plugins (hook ``register_benchmarks``): a class with ``kind``, ``help``,
``add_arguments(parser)`` and ``run(args) -> dict`` with keys ``bench``, ``description``,
``figures``, ``baseline`` and ``ratios``. Each backend ships the benchmark of its own speed target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..plugins import get_registry

    p = subparsers.add_parser("bench", help="benchmarks with a baseline measured in the same run")
    sub = p.add_subparsers(dest="bench", metavar="BENCH")
    for record in get_registry().records():
        if record.role != "benchmark":
            continue
        bench = record.cls
        bp = sub.add_parser(record.kind, help=f"{bench.help} ({record.distribution})")
        bench.add_arguments(bp)
        bp.add_argument("--json", action="store_true", help="print one JSON object")
        bp.set_defaults(func=_runner(bench.run))
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _runner(run_bench: Callable[[argparse.Namespace], dict[str, Any]]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        report = run_bench(args)
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
