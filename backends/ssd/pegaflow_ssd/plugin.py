"""Entry point of pegaflow-ssd (group ``pegaflow``, name ``ssd``)."""

from __future__ import annotations

from pegaflow_core import hookimpl
from pegaflow_core.hookspecs import Register


@hookimpl
def register_tiers(register: Register) -> None:
    """Register the SSD tier (kind 'ssd'). liburing is imported only when a tier is built."""
    from .tier import SsdTier

    register(SsdTier)


@hookimpl
def register_benchmarks(register: Register) -> None:
    """Register ``pegaflow bench ssd`` (tier GB/s against fio with O_DIRECT on the same disk)."""
    from .bench import SsdBenchmark

    register(SsdBenchmark)
