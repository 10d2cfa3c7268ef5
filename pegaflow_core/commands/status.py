"""``pegaflow status``: a readable summary of a running daemon."""

from __future__ import annotations

import argparse
import json

from ..sizes import format_size


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("status", help="summary of a running daemon: tiers, hits, traffic, leases")
    p.add_argument("--endpoint", default="127.0.0.1:50055", help="daemon address (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..client import PegaflowClient

    with PegaflowClient(args.endpoint, timeout_s=3.0, description="pegaflow status") as client:
        health = client.health()
        stats = client.stats()
    counters = dict(stats.counters)
    hits = counters.get("query_blocks_total{result=hit}", 0.0)
    misses = counters.get("query_blocks_total{result=miss}", 0.0)
    summary = {
        "endpoint": args.endpoint, "node": health.node, "version": health.version, "daemon_id": stats.daemon_id,
        "uptime_s": round(stats.uptime_s, 1),
        "tiers": [{"name": t.name, "kind": t.kind, "capacity_bytes": t.capacity_bytes, "used_bytes": t.used_bytes, "blocks": t.blocks} for t in stats.tiers],
        "index_blocks": stats.index_blocks, "pinned_blocks": stats.pinned_blocks, "leases": stats.leases,
        "contexts": stats.contexts, "sessions": stats.sessions,
        "hit_rate": hits / (hits + misses) if hits + misses else None, "counters": counters,
        "degraded": list(health.degraded), "warming": health.warming,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"pegaflow {health.version} on {health.node} at {args.endpoint}  (daemon {stats.daemon_id}, up {stats.uptime_s:.0f}s)")
    for problem in health.degraded:
        print(f"  DEGRADED: {problem}")
    for t in stats.tiers:
        share = 100.0 * t.used_bytes / t.capacity_bytes if t.capacity_bytes else 0.0
        print(f"  tier {t.name:<8} {t.kind:<8} {format_size(t.used_bytes):>10} / {format_size(t.capacity_bytes):<10} ({share:4.1f}%)  {t.blocks} blocks")
    rate = "n/a" if summary["hit_rate"] is None else f"{100 * summary['hit_rate']:.1f}%"
    print(f"  blocks indexed {stats.index_blocks}, pinned {stats.pinned_blocks}, leases {stats.leases}")
    print(f"  contexts {stats.contexts}, sessions {stats.sessions}")
    print(f"  query hit rate {rate} ({hits:.0f} hit / {misses:.0f} missed blocks)")
    for direction in ("save", "load", "spill", "promote"):
        moved = sum(v for k, v in counters.items() if k.startswith("bytes_total{") and f"direction={direction}" in k)
        if moved:
            print(f"  {direction:<8} {format_size(int(moved))}")
    evicted = sum(v for k, v in counters.items() if k.startswith("evictions_total"))
    print(f"  evictions {evicted:.0f}, deduplicated saves {counters.get('saves_deduplicated_total', 0):.0f}, "
          f"dropped saves {counters.get('saves_dropped_total', 0):.0f}")
    return 0
