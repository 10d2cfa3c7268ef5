"""Entry point of ``pegaflow-redis``: registers the ``redis`` index and its benchmark."""

from __future__ import annotations

from pegaflow_core.hookspecs import Register, hookimpl

from .bench import RedisIndexBenchmark
from .index import RedisIndex


@hookimpl
def register_indexes(register: Register) -> None:
    """The cluster index, ``index: {kind: redis}``."""
    register(RedisIndex)


@hookimpl
def register_benchmarks(register: Register) -> None:
    """``pegaflow bench redis-index``."""
    register(RedisIndexBenchmark)
