"""Subcommands of the ``pegaflow`` CLI, one module each.

A command module exposes ``add_parser(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed ``argparse.Namespace`` and returning an exit status (None counts as 0).
``func`` may raise any ``PegaflowError``: the CLI prints it as one line and exits 2, so commands
never format errors themselves. Heavy imports (grpc, the daemon) belong inside ``func``, so that
``pegaflow --help`` and ``pegaflow backends`` stay fast and work when a command's dependencies are
broken. To add a command, add its module name to ``COMMAND_MODULES`` in ``pegaflow_core/cli.py``.
"""

from __future__ import annotations

from collections.abc import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Rows as left-aligned columns under ``headers``; the last column is not padded, so a long
    error message does not push every line out to its width."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    lines = []
    for row in (headers, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths)] + [row[-1]]
        lines.append((indent + "  ".join(cells)).rstrip())
    return "\n".join(lines)
