"""Human sizes (``30gb``, ``500mb``, ``1.5tb``, ``4096``) to bytes and back.

Units are binary (1kb = 1024 bytes), as memory pools are sized in pages, not in SI units.
"""

from __future__ import annotations

import re

from .errors import InvalidArgument

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
