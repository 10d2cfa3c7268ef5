"""Human sizes (``30gb``, ``500mb``, ``1.5tb``, ``4096``) to bytes and back, and durations
(``30s``, ``500ms``, ``2m``, ``1.5``) to seconds.

Units are binary (1kb = 1024 bytes), as memory pools are sized in pages, not in SI units.
``Size`` and ``Duration`` mark backend option fields so the config loader knows to accept the
human forms.
"""

from __future__ import annotations

import math
import re
from typing import NewType

from .errors import InvalidArgument

Size = NewType("Size", int)  # an option field in bytes that YAML may write as '30gb'
Duration = NewType("Duration", float)  # an option field in seconds that YAML may write as '500ms'

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(value: int | str) -> int:
    """Return ``value`` in bytes; raise InvalidArgument saying what a size looks like."""
    if isinstance(value, bool):
        raise InvalidArgument(f"expected a size like '30gb', '500mb' or a byte count, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgument(f"expected a non-negative size, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            number, unit, _ = match.groups()
            return int(float(number) * _UNITS[unit.lower()])
    raise InvalidArgument(f"expected a size like '30gb', '500mb' or a byte count, got {value!r}")


def format_size(nbytes: int) -> str:
    """Shortest readable form, e.g. ``1.5 GiB``."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"


_DURATION_UNITS = {"ms": 1e-3, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)


def parse_duration(value: int | float | str) -> float:
    """Return ``value`` in seconds (bare numbers are seconds); raise InvalidArgument otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0 or not math.isfinite(value):
            raise InvalidArgument(f"expected a finite, non-negative duration, got {value}")
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            number, unit = match.groups()
            return float(number) * _DURATION_UNITS[(unit or "").lower()]
    raise InvalidArgument(f"expected a duration like '30s', '500ms', '2m' or seconds, got {value!r}")
