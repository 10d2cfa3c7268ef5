"""Entry point of pegaflow-ucx (group ``pegaflow``, name ``ucx``). Importing it imports neither
ucxx nor UCX: the transport loads them when built, the benchmark when run."""

from __future__ import annotations

from pegaflow_core import hookimpl
from pegaflow_core.hookspecs import Register


@hookimpl
def register_transports(register: Register) -> None:
    """Register the UCX transport (kind 'ucx')."""
    from .transport import UcxTransport

    register(UcxTransport)


@hookimpl
def register_benchmarks(register: Register) -> None:
    """Register `pegaflow bench ucx`: transport reads vs ucx_perftest vs a plain socket copy."""
    from .bench import UcxBenchmark

    register(UcxBenchmark)
