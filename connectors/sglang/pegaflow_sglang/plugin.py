"""Entry point of pegaflow-sglang in pegaflow's plugin group (``pegaflow``, name ``sglang``), so
that ``pegaflow backends`` lists the connector and says whether the installed SGLang can run it.
Importing this module never imports SGLang or torch; only ``availability()`` does, when asked."""

from __future__ import annotations

import importlib.metadata
import re
from typing import ClassVar

from pegaflow_core import hookimpl
from pegaflow_core.backend import Availability
from pegaflow_core.hookspecs import Register

SUPPORTED = ((0, 5, 23), (0, 6))  # SGLang [0.5.23, 0.6): HiCacheStorage v1 + the radix-cache registry


def _release(version: str) -> tuple[int, ...]:
    """Leading numeric release parts: "0.5.23rc1" -> (0, 5, 23), "0.6.0+cu130" -> (0, 6, 0)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.group() != piece:
            break
    return tuple(parts)


class SglangConnector:
    """Descriptor of the SGLang connector (the classes live in pegaflow_sglang.store / .radix)."""

    kind: ClassVar[str] = "sglang"
    connector_class: ClassVar[str] = "pegaflow_sglang.store:PegaflowStore"

    @classmethod
    def availability(cls) -> Availability:
        """SGLang installed, in the supported range, and its storage/registry API importable."""
        try:
            version = importlib.metadata.version("sglang")
        except importlib.metadata.PackageNotFoundError:
            return Availability(False, "sglang is not installed (pip install 'sglang>=0.5.23,<0.6')")
        low, high = SUPPORTED
        if not low <= _release(version) < high:
            return Availability(False, f"sglang {version} is outside the supported range >=0.5.23,<0.6")
        try:
            import sglang.srt.mem_cache.hicache_storage  # noqa: F401
            import sglang.srt.mem_cache.registry  # noqa: F401
        except Exception as exc:  # a broken install must show up here, not crash the listing
            return Availability(False, f"sglang {version} does not import: {type(exc).__name__}: {exc}")
        return Availability(True, f"sglang {version}")


@hookimpl
def register_connectors(register: Register) -> None:
    """Register the SGLang connector descriptor (kind 'sglang')."""
    register(SglangConnector)
