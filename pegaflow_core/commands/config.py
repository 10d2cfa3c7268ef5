"""``pegaflow config check FILE`` and ``pegaflow config show [FILE]``.

``check`` is what to run before restarting a daemon on an edited file: it validates everything the
daemon would (kinds installed and available, every option) without building any backend, so it
allocates no memory and touches no state. ``show`` prints the effective config with every default
filled in and each option's help as a comment: a starting point for a new file.
"""

from __future__ import annotations

import argparse

from ..config import ComponentConfig, DaemonConfig, load_config
from . import format_table


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("config", help="validate a config file or print the effective config")
    sub = p.add_subparsers(dest="config_command", metavar="{check,show}")
    check = sub.add_parser("check", help="validate FILE and summarise its tier stack (exit 2 if invalid)")
    check.add_argument("file", metavar="FILE", help="YAML config file")
    check.set_defaults(func=run_check)
    show = sub.add_parser("show", help="print the effective config as YAML (the embedded default without FILE)")
    show.add_argument("file", metavar="FILE", nargs="?", help="YAML config file")
    show.add_argument("--no-comments", action="store_true", help="leave out the help comments")
    show.set_defaults(func=run_show)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_check(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    print(summary(config))
    return 0


def run_show(args: argparse.Namespace) -> int:
    print(load_config(args.file).to_yaml(comments=not args.no_comments), end="")
    return 0


def summary(config: DaemonConfig) -> str:
    """A few lines a person can check at a glance: server, index, the tier stack top to bottom."""
    server = config.server
    lines = [
        f"{config.source}: valid",
        f"server     listen {server.listen}, metrics {server.metrics or 'off'}, "
        f"device {'none' if server.device is None else server.device}, lease_ttl {server.lease_ttl:g}s, "
        f"node {server.node}",
        f"index      {_component(config.index)}",
        f"transport  {'none' if config.transport is None else _component(config.transport)}",
        f"tiers      {len(config.tiers)}, top to bottom:",
    ]
    rows = [
        [str(i), tier.name, tier.kind, ", ".join(f"{k} {v}" for k, v in tier.option_items(brief=True)) or "-"]
        for i, tier in enumerate(config.tiers)
    ]
    lines.append(format_table(["#", "NAME", "KIND", "OPTIONS"], rows, indent="  "))
    return "\n".join(lines)


def _component(component: ComponentConfig) -> str:
    options = ", ".join(f"{k} {v}" for k, v in component.option_items(brief=True))
    return f"{component.kind} ({options})" if options else component.kind
