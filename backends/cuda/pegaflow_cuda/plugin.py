"""Entry point of pegaflow-cuda (group ``pegaflow``, name ``cuda``). Importing it loads no CUDA
library: the memory kind initialises the driver when the daemon first needs it."""

from __future__ import annotations

from pegaflow_core import hookimpl
from pegaflow_core.hookspecs import Register


@hookimpl
def register_memory_kinds(register: Register) -> None:
    """Register the cuda_ipc memory kind."""
    from .memory import CudaIpcMemory

    register(CudaIpcMemory)


@hookimpl
def register_benchmarks(register: Register) -> None:
    """Register `pegaflow bench gpu`: save/load through the daemon over CUDA IPC vs pinned memcpy."""
    from .bench import GpuBenchmark

    register(GpuBenchmark)
