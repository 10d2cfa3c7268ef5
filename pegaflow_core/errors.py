"""One exception hierarchy for everything a user or a backend author can trip over.

Messages say what was wrong, where, and what would be right, e.g.
``tiers[1].capacity: expected a size like '30gb', got 'lots'``.
"""

from __future__ import annotations


class PegaflowError(Exception):
    """Base of every error pegaflow raises on purpose."""


class ConfigError(PegaflowError):
    """A config file or flag is invalid. Carries the file and the key path it concerns."""

    def __init__(self, message: str, *, file: str | None = None, path: str = "") -> None:
        self.file = file
        self.path = path
        self.reason = message
        where = ": ".join(part for part in (file, path) if part)
        super().__init__(f"{where}: {message}" if where else message)


class PluginError(PegaflowError):
    """A backend is unknown, failed to import, or its native dependency is missing."""


class InvalidArgument(PegaflowError, ValueError):
    """A caller passed a bad value to an interface (wrong size, bad key, mismatched batch)."""


class NotFound(PegaflowError, KeyError):
    """A named thing (lease, instance, region, peer) does not exist."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else ""


class CapacityError(PegaflowError):
    """A request can never fit (e.g. a block larger than the whole tier)."""


class TransportError(PegaflowError):
    """A peer is unreachable, timed out or dropped the connection."""


class IntegrityError(PegaflowError):
    """Stored bytes failed their checksum; treat as a miss, never serve them."""


class ClosedError(PegaflowError):
    """The object was closed and cannot be used any more."""


class DaemonUnavailable(TransportError):
    """The daemon cannot be reached (not started, restarting, or gone). Connectors treat this as a
    cache miss and keep serving."""
