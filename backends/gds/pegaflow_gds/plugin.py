"""Entry point of pegaflow-gds (group ``pegaflow``, name ``gds``)."""

from __future__ import annotations

from pegaflow_core import hookimpl
from pegaflow_core.hookspecs import Register


@hookimpl
def register_tiers(register: Register) -> None:
    """Register the GDS tier (kind 'gds'). kvikio and CUDA load only when a tier is built or probed."""
    from .tier import GdsTier

    register(GdsTier)


@hookimpl
def register_benchmarks(register: Register) -> None:
    """Register ``pegaflow bench gds`` (GPU <-> file GB/s against O_DIRECT and the ssd host path)."""
    from .bench import GdsBenchmark

    register(GdsBenchmark)
