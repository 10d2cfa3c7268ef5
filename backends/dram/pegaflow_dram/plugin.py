"""Entry point of pegaflow-dram (group ``pegaflow``, name ``dram``)."""

from __future__ import annotations

from pegaflow_core import hookimpl
from pegaflow_core.hookspecs import Register


@hookimpl
def register_tiers(register: Register) -> None:
    """Register the DRAM tier (kind 'dram'). Importing it loads numpy only, never CUDA."""
    from .tier import DramTier

    register(DramTier)
