"""What every pluggable backend class (tier, transport, index) has in common.

A backend class names its ``kind`` (the YAML ``kind:``), declares its options as a frozen
dataclass ``Options`` (validated by the config loader before the backend is built with
``cls(options)``), and can say whether it runs on this machine without importing anything heavy
at module import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class NoOptions:
    """Options of a backend that takes none."""


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and if not, why (shown by ``pegaflow backends``)."""

    ok: bool
    detail: str = ""


class Backend:
    kind: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    @classmethod
    def availability(cls) -> Availability:
        """Probe optional native dependencies (import them lazily here); never raise."""
        return Availability(True)
