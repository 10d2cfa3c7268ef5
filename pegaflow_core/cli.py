"""The ``pegaflow`` and ``pegaflow-server`` commands.

``pegaflow`` is a thin argparse shell over the modules in ``pegaflow_core.commands``; each one adds
its own subcommand. A module listed in ``COMMAND_MODULES`` that is not installed is skipped, so the
CLI keeps working while commands are added or when a distribution ships without one. Every
``PegaflowError`` becomes one ``pegaflow: error: ...`` line and exit status 2: users get the
message that says what to fix, not a traceback (``-vv`` adds the traceback for bug reports).

``pegaflow-server`` keeps the seed's flags (``--addr --device --pool-size``) so existing launch
scripts keep working; it is ``pegaflow serve`` with those flags mapped onto the config.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from . import __version__
from .errors import ConfigError, PegaflowError

COMMAND_MODULES: tuple[str, ...] = ("serve", "status", "backends", "config", "bench", "demo")
DEFAULT_ADDR = "127.0.0.1:50055"
DAEMON_MODULE = f"{__package__}.daemon"


def command_modules() -> list[ModuleType]:
    """The installed command modules, in ``COMMAND_MODULES`` order."""
    found = []
    for name in COMMAND_MODULES:
        qualified = f"{__package__}.commands.{name}"
        if importlib.util.find_spec(qualified) is not None:
            found.append(importlib.import_module(qualified))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pegaflow",
        description="pegaflow: a per-machine KV-cache service for LLM inference engines",
    )
    parser.add_argument("--version", action="version", version=f"pegaflow {__version__}")
    _add_verbose(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in command_modules():
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pegaflow``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    _configure_logging(args.verbose, default=None)
    return _run("pegaflow", args.verbose, lambda: func(args))


def server_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pegaflow-server``: the seed's flags, or ``--config FILE``; runs the daemon
    in the foreground until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="pegaflow-server",
        description="run the pegaflow daemon (same as `pegaflow serve`, with the seed's flags)",
    )
    parser.add_argument("--addr", metavar="HOST:PORT", help=f"gRPC listen address (default {DEFAULT_ADDR})")
    parser.add_argument("--device", type=int, metavar="N", help="CUDA device index the daemon serves")
    parser.add_argument("--pool-size", metavar="SIZE",
                        help="DRAM tier capacity, e.g. 30gb (default: a fraction of free memory)")
    parser.add_argument("--config", "-c", metavar="FILE",
                        help="YAML config file; --addr and --device then override its server section")
    parser.add_argument("--version", action="version", version=f"pegaflow-server {__version__}")
    _add_verbose(parser)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, default=logging.INFO)
    return _run("pegaflow-server", args.verbose, lambda: _serve(args))


def _serve(args: argparse.Namespace) -> int:
    from .config import FLAGS_SOURCE, config_from_server_flags, load_config

    if args.config is not None:
        if args.pool_size is not None:
            raise ConfigError(
                "cannot be combined with --config; set the dram tier's capacity in the file",
                file=FLAGS_SOURCE, path="--pool-size",
            )
        config = load_config(args.config)
        changes: dict[str, Any] = {}
        if args.addr is not None:
            changes["listen"] = args.addr
        if args.device is not None:
            changes["device"] = args.device
        if changes:
            config = config.with_server(**changes)
    else:
        config = config_from_server_flags(args.addr or DEFAULT_ADDR, args.device, args.pool_size)
    _daemon_entry()(config)
    return 0


def _daemon_entry() -> Callable[[Any], None]:
    """``pegaflow_core.daemon.serve_forever``, imported only now: it pulls in grpc and the tier
    stack, which listing backends or checking a config never needs."""
    if importlib.util.find_spec(DAEMON_MODULE) is None:
        raise PegaflowError(f"this installation has no daemon ({DAEMON_MODULE} is missing); reinstall pegaflow-core")
    return importlib.import_module(DAEMON_MODULE).serve_forever


def _run(prog: str, verbose: int, call: Callable[[], int | None]) -> int:
    try:
        status = call()
    except PegaflowError as exc:
        if verbose >= 2:  # for bug reports; printed, not logged, so it shows however logging is set up
            traceback.print_exc(file=sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pegaflow backends | head`: the reader left, which is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail too
        return 141
    return 0 if status is None else status


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more: -v for info, -vv for debug (and tracebacks of errors)")


def _configure_logging(verbose: int, *, default: int | None) -> None:
    """Set up logging only when asked (or for the daemon, which should say what it serves):
    a command such as ``serve`` may configure its own."""
    level = {0: default, 1: logging.INFO}.get(verbose, logging.DEBUG)
    if level is not None:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger().setLevel(level)
