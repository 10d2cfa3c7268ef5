"""Entry point of pegaflow-bench-engine (group ``pegaflow``): registers ``pegaflow bench engine``.
Nothing heavy is imported here; torch is imported when the benchmark runs."""

from __future__ import annotations

from pegaflow_core import hookimpl
from pegaflow_core.hookspecs import Register


@hookimpl
def register_benchmarks(register: Register) -> None:
    """Register ``pegaflow bench engine`` (TTFT cold/warm, shared pool, restart, MLA)."""
    from .bench import EngineBenchmark

    register(EngineBenchmark)
