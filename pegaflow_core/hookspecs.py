"""Hooks a pegaflow plugin can implement. Each receives a ``register(cls)`` callback."""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("pegaflow")
hookimpl = pluggy.HookimplMarker("pegaflow")

Register = Callable[[type], None]


@hookspec
def register_tiers(register: Register) -> None:
    """Register Tier subclasses (storage tiers such as dram, ssd)."""


@hookspec
def register_transports(register: Register) -> None:
    """Register Transport subclasses (loopback, ucx, rdma)."""


@hookspec
def register_indexes(register: Register) -> None:
    """Register Index subclasses (local, redis)."""


@hookspec
def register_connectors(register: Register) -> None:
    """Register engine connector descriptors (vllm, sglang) so `pegaflow backends` lists them."""


@hookspec
def register_benchmarks(register: Register) -> None:
    """Register benchmark classes for `pegaflow bench <kind>` (see commands/bench.py)."""


@hookspec
def register_memory_kinds(register: Register) -> None:
    """Register EngineMemory subclasses: the region kinds engines register KV memory as (shm, cma,
    cuda_ipc) and the copies between that memory and the tiers."""
