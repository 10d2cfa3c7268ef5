"""NUMA placement of the pool: which node, and binding a mapping to it with mbind(2).

A pool on the GPU's NUMA node keeps host<->device copies off the inter-socket link, which on
two-socket machines costs a third or more of the copy bandwidth. The kernel call is made through
ctypes (``syscall(SYS_mbind, ...)``) so neither libnuma nor its Python binding is needed. The
binding must happen before the pages are first touched: mbind only places pages faulted later.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from pathlib import Path

log = logging.getLogger("pegaflow.dram.numa")

_NODE_DIR = Path("/sys/devices/system/node")
_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
_SYS_MBIND = {"x86_64": 237, "aarch64": 235, "ppc64le": 259}
_MPOL_BIND = 2
_MPOL_MF_STRICT = 1
_MPOL_MF_MOVE = 2


def online_nodes() -> list[int]:
    """NUMA nodes that have memory; ``[0]`` where the kernel exposes no NUMA information."""
    try:
        text = (_NODE_DIR / "has_memory").read_text().strip() or (_NODE_DIR / "online").read_text().strip()
    except OSError:
        return [0]
    nodes: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        nodes.extend(range(int(lo), int(hi or lo) + 1))
    return nodes or [0]


def gpu_pci_addresses() -> list[str]:
    """PCI addresses of the NVIDIA GPUs, in PCI bus order, as the driver lists them.

    This is CUDA's order under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; it is read from /proc so that
    no CUDA library is loaded just to place memory.
    """
    try:
        return sorted(entry.name.lower() for entry in _NVIDIA_GPUS.iterdir())
    except OSError:
        return []


def gpu_node(device: int) -> int | None:
    """The NUMA node of CUDA device ``device`` (after ``CUDA_VISIBLE_DEVICES``), or None."""
    addresses = gpu_pci_addresses()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        try:
            order = [int(part) for part in visible.split(",") if part.strip()]
        except ValueError:  # UUIDs or MIG names: we cannot map them without CUDA
            return None
        addresses = [addresses[i] for i in order if 0 <= i < len(addresses)]
    if not 0 <= device < len(addresses):
        return None
    try:
        node = int(Path("/sys/bus/pci/devices", addresses[device], "numa_node").read_text())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def bind(address: int, length: int, node: int) -> None:
    """Bind ``[address, address + length)`` to ``node``; OSError says why when the kernel refuses."""
    number = _SYS_MBIND.get(platform.machine())
    if number is None:
        raise OSError(f"mbind: unsupported architecture {platform.machine()!r}")
    if node < 0 or node >= 1024:
        raise OSError(f"mbind: node {node} is out of range")
    mask = (ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong))))()
    bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    mask[node // bits] = 1 << (node % bits)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(
        ctypes.c_long(number),
        ctypes.c_void_p(address),
        ctypes.c_ulong(length),
        ctypes.c_int(_MPOL_BIND),
        mask,
        ctypes.c_ulong(1024 + 1),
        ctypes.c_uint(_MPOL_MF_STRICT | _MPOL_MF_MOVE),
    )
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mbind to NUMA node {node} failed: {os.strerror(errno)}")


def resolve(setting: int | str | None, device: int) -> tuple[int | None, str]:
    """The node to bind to for option ``numa`` and a phrase for logs and ``availability``.

    ``None`` (and 'auto' on a one-node machine or without a GPU) means "leave placement to the
    kernel". An explicit node that does not exist raises ValueError naming the nodes that do.
    """
    nodes = online_nodes()
    if setting is None:
        return None, "numa: off"
    if setting == "auto":
        if len(nodes) < 2:
            return None, "numa: one node"
        node = gpu_node(device)
        if node is None:
            return None, f"numa: auto found no node for GPU {device}"
        return node, f"numa: node {node} (GPU {device})"
    if not isinstance(setting, int) or setting not in nodes:
        raise ValueError(f"numa: expected 'auto', null or one of the nodes with memory {nodes}, got {setting!r}")
    return setting, f"numa: node {setting}"
