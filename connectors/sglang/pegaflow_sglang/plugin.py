"""Entry point of pegaflow-sglang in pegaflow's plugin group (``pegaflow``, name ``sglang``), so
that ``pegaflow backends`` lists the connector and says whether the installed SGLang can run it.
Importing this module never imports SGLang or torch; only ``availability()`` does, when asked."""

from __future__ import annotations

from typing import ClassVar

from pegaflow_core import hookimpl
from pegaflow_core.backend import Availability, package_availability
from pegaflow_core.hookspecs import Register

SUPPORTED = ((0, 5, 23), (0, 6))  # SGLang [0.5.23, 0.6): HiCacheStorage v1 + the radix-cache registry


class SglangConnector:
    """Descriptor of the SGLang connector (the classes live in pegaflow_sglang.store / .radix)."""

    kind: ClassVar[str] = "sglang"
    connector_class: ClassVar[str] = "pegaflow_sglang.store:PegaflowStore"

    @classmethod
    def availability(cls) -> Availability:
        """SGLang installed, in the supported range, and its storage/registry API importable."""
        return package_availability("sglang", *SUPPORTED, ["sglang.srt.mem_cache.hicache_storage",
                                                            "sglang.srt.mem_cache.registry"])


@hookimpl
def register_connectors(register: Register) -> None:
    """Register the SGLang connector descriptor (kind 'sglang')."""
    register(SglangConnector)
