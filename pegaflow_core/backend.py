"""What every pluggable backend class (tier, transport, index) has in common.

A backend class names its ``kind`` (the YAML ``kind:``), declares its options as a frozen
dataclass ``Options`` (validated by the config loader before the backend is built with
``cls(options)``), and can say whether it runs on this machine without importing anything heavy
at module import time.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar


@dataclass(frozen=True)
class NoOptions:
    """Options of a backend that takes none."""


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and if not, why (shown by ``pegaflow backends``)."""

    ok: bool
    detail: str = ""


def release_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric release parts of a version string: "0.34.0rc1" -> (0, 34, 0),
    "0.6.0+cu130" -> (0, 6, 0)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.group() != piece:
            break
    return tuple(parts)


def package_availability(dist: str, low: tuple[int, ...], high: tuple[int, ...], modules: Sequence[str]) -> Availability:
    """A connector's check of the engine it plugs into: distribution ``dist`` installed, its
    release in ``[low, high)`` (compared on as many parts as ``low`` has), and ``modules``
    importable. Import errors are reported, never raised: a broken engine install must show up
    in ``pegaflow backends``, not crash the listing."""
    def dotted(v: tuple[int, ...]) -> str:
        return ".".join(map(str, v))

    supported = f">={dotted(low)},<{dotted(high)}"
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return Availability(False, f"{dist} is not installed (pip install '{dist}{supported}')")
    if not low <= release_tuple(version)[: len(low)] < high:
        return Availability(False, f"{dist} {version} is outside the supported range {supported}")
    try:
        for module in modules:
            importlib.import_module(module)
    except Exception as exc:
        return Availability(False, f"{dist} {version} does not import: {type(exc).__name__}: {exc}")
    return Availability(True, f"{dist} {version}")


class Backend:
    kind: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    @classmethod
    def availability(cls) -> Availability:
        """Probe optional native dependencies (import them lazily here); never raise."""
        return Availability(True)

    @classmethod
    def conformance_options(cls, tmp_path: Path, capacity_bytes: int | None = None) -> Any:
        """Options to build a small instance for ``pytest --pegaflow-conformance``.

        ``tmp_path`` is a fresh directory the backend may use; ``capacity_bytes`` is the capacity
        a tier should have (None for transports and indexes). Return None (the default) when the
        backend cannot be built without outside help; its contracts are then skipped with that reason.
        """
        return None


def check_options(options: Any) -> None:
    """Run the per-field ``check`` callables of an Options dataclass (its fields' metadata) for
    options built in code; the config loader runs the same checks key by key for YAML. Call it
    from ``__post_init__``. A check raises ValueError("expected ..., got ...")."""
    from dataclasses import fields

    from .errors import InvalidArgument

    for f in fields(options):
        check = f.metadata.get("check")
        if check is not None:
            try:
                check(getattr(options, f.name))
            except ValueError as exc:
                raise InvalidArgument(f"{f.name}: {exc}") from None


def is_int(value: Any) -> bool:
    """An int that is not a bool (YAML's true/false must never pass for a count)."""
    return isinstance(value, int) and not isinstance(value, bool)
