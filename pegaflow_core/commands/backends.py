"""``pegaflow backends``: what is installed, where it came from, and whether it runs here.

Answers "why does my config say unknown kind" and "why is rdma unavailable" without reading
tracebacks: every registered backend with its distribution, version and availability probe, and
every plugin that failed to load with its error.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from . import format_table


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "backends", help="list installed backends, their versions and whether they run on this machine"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def collect() -> dict[str, Any]:
    """Backends and broken plugins as plain data (the ``--json`` output)."""
    from ..plugins import get_registry

    registry = get_registry()
    backends = []
    for record in registry.records():
        availability = record.availability()
        backends.append({
            "role": record.role,
            "kind": record.kind,
            "plugin": record.plugin,
            "distribution": record.distribution,
            "version": record.version,
            "available": bool(availability.ok),
            "detail": availability.detail,
        })
    broken = [{"plugin": b.plugin, "distribution": b.distribution, "error": b.error} for b in registry.broken]
    return {"backends": backends, "broken": broken}


def run(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if report["backends"]:
        rows = [
            [b["role"], b["kind"], b["distribution"], b["version"],
             _availability(b["available"], b["detail"])]
            for b in report["backends"]
        ]
        print(format_table(["ROLE", "KIND", "DISTRIBUTION", "VERSION", "AVAILABILITY"], rows))
    else:
        print("no backends registered")
    if report["broken"]:
        print("\nplugins that failed to load (their backends are missing above):")
        rows = [[b["plugin"], b["distribution"], b["error"]] for b in report["broken"]]
        print(format_table(["PLUGIN", "DISTRIBUTION", "ERROR"], rows))
    return 0


def _availability(ok: bool, detail: str) -> str:
    if ok:
        return f"ok ({detail})" if detail else "ok"
    return f"unavailable: {detail or 'no reason given'}"
