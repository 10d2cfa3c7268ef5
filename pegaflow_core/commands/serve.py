"""``pegaflow serve``: run the daemon in the foreground."""

from __future__ import annotations

import argparse
import logging


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the pegaflow daemon (embedded default config unless --config)")
    p.add_argument("--config", "-c", metavar="FILE", help="YAML tier-stack config")
    p.add_argument("--listen", metavar="HOST:PORT", help="override server.listen")
    p.add_argument("--metrics", metavar="HOST:PORT|off", help="override server.metrics")
    p.add_argument("--cold", action="store_true",
                   help="start empty: do not re-attach what persistent tiers held before (their 'recover' option)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..daemon import serve_forever

    config = load_config(args.config)
    changes: dict[str, object] = {}
    if args.listen:
        changes["listen"] = args.listen
    if args.metrics:
        changes["metrics"] = None if args.metrics == "off" else args.metrics
    if changes:
        config = config.with_server(**changes)
    if args.cold:
        config = config.without_recovery()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve_forever(config)
    return 0
