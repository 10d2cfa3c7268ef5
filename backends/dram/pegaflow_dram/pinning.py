"""Page-locking the pool for the GPU with cudaHostRegister, without importing CUDA at import time.

Pinned (page-locked, device-mapped) host memory is what lets the daemon's GPU copies run at PCIe
speed (about 50 GB/s on the H100 machine) instead of through a driver staging buffer. We register
the pool we already mapped rather than allocate with cudaHostAlloc, because the pool must live in a
named shared-memory file (warm restart) and be NUMA-placed first.

The CUDA runtime is reached, in order, through cuda-python, torch (only if it is installed), or
libcudart via ctypes. None of them is imported unless a GPU device node exists.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pegaflow_core import pinned

# Portable: pinned for every CUDA context, not only the current device's. Mapped: GPU kernels may
# read and write it directly (the daemon's batched copy kernels do), at the host address on UVA.
_HOST_REGISTER_FLAGS = 1 | 2


def gpu_present() -> bool:
    """Whether an NVIDIA device node exists; cheap, loads nothing."""
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def runtime_hint() -> str:
    """What would be used to pin, for ``availability()``; imports nothing."""
    if not gpu_present():
        return "pinning: no GPU"
    for module, label in (("cuda", "cuda-python"), ("torch", "torch")):
        if importlib.util.find_spec(module) is not None:
            return f"pinning: GPU present, via {label}"
    if ctypes.util.find_library("cudart"):
        return "pinning: GPU present, via libcudart"
    return "pinning: GPU present but no CUDA runtime (install cuda-python or torch)"


@dataclass
class Pinned:
    """A registered range; ``release`` unregisters it (call before unmapping)."""

    address: int
    length: int
    via: str
    _unregister: Callable[[int], None]

    def release(self) -> None:
        pinned.remove(self.address)
        self._unregister(self.address)


def pin(address: int, length: int) -> Pinned:
    """cudaHostRegister ``[address, address + length)``; RuntimeError says why when impossible."""
    if not gpu_present():
        raise RuntimeError("no NVIDIA GPU on this machine (/dev/nvidia0 and /proc/driver/nvidia/gpus are absent)")
    errors: list[str] = []
    for attempt in (_via_cuda_python, _via_torch, _via_libcudart):
        try:
            registered = attempt(address, length)
            pinned.add(address, length)
            return registered
        except ImportError as exc:
            errors.append(str(exc))
        except RuntimeError as exc:
            raise RuntimeError(f"cudaHostRegister of {length} bytes failed: {exc}") from exc
    raise RuntimeError("no CUDA runtime to pin with: " + "; ".join(errors))


def _via_cuda_python(address: int, length: int) -> Pinned:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except ImportError:
            raise ImportError("cuda-python is not installed") from None
    (err,) = cudart.cudaHostRegister(address, length, _HOST_REGISTER_FLAGS)
    if int(err) != 0:
        raise RuntimeError(f"cuda-python: {err}")

    def unregister(addr: int) -> None:
        cudart.cudaHostUnregister(addr)

    return Pinned(address, length, "cuda-python", unregister)


def _via_torch(address: int, length: int) -> Pinned:
    if importlib.util.find_spec("torch") is None:
        raise ImportError("torch is not installed")
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no usable CUDA device")
    runtime = torch.cuda.cudart()
    err = runtime.cudaHostRegister(address, length, _HOST_REGISTER_FLAGS)
    if int(err) != 0:
        raise RuntimeError(f"torch cudart error {int(err)}")
    return Pinned(address, length, "torch", lambda addr: runtime.cudaHostUnregister(addr))


def _via_libcudart(address: int, length: int) -> Pinned:
    name = ctypes.util.find_library("cudart") or os.environ.get("PEGAFLOW_CUDART", "libcudart.so")
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise ImportError(f"libcudart not found ({name})") from None
    lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
    err = lib.cudaHostRegister(address, length, _HOST_REGISTER_FLAGS)
    if err != 0:
        raise RuntimeError(f"libcudart error {err}")
    return Pinned(address, length, "libcudart", lambda addr: lib.cudaHostUnregister(addr))
