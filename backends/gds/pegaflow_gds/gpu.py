"""GPU memory as the GDS tier sees it: checking that caller addresses are device memory inside
one allocation, and the xxhash64 of a block held in GPU segments.

Why hash through the host: the ssd format stores each payload's xxhash64 (verified on every read,
so wrong KV is never served), and there is no xxhash64 kernel in the project yet. The block is
copied back over PCIe (tens of GB/s, far above a disk) into host memory and hashed there. This is
the one host copy left on the direct path; a device hash kernel would remove it without changing
the format.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import xxhash

from pegaflow_core import InvalidArgument
from pegaflow_cuda import driver
from pegaflow_cuda.driver import CudaError, Device, check

_devices: dict[int, Device] = {}
_devices_lock = threading.Lock()


def _device(ordinal: int) -> Device:
    with _devices_lock:
        device = _devices.get(ordinal)
        if device is None:
            device = _devices[ordinal] = Device(ordinal)
        return device


def _attribute(name: str, address: int) -> int:
    attr = getattr(driver.cu.CUpointer_attribute, name)
    return int(check(driver.cu.cuPointerGetAttribute(attr, address), f"cuPointerGetAttribute({name})"))


def device_of(batch: Sequence[Sequence[tuple[int, int]]], what: str) -> list[list[int]]:
    """The GPU ordinal of every segment; InvalidArgument naming ``what[i][j]`` for an address that
    is not GPU memory or a range that runs past its allocation."""
    driver.init()
    if not int(check(driver.cu.cuCtxGetCurrent(), "cuCtxGetCurrent")):
        _device(0).enter()  # pointer queries want some context current; UVA covers every GPU
    ordinals: list[list[int]] = []
    for i, segments in enumerate(batch):
        row = []
        for j, (address, nbytes) in enumerate(segments):
            where = f"{what}[{i}][{j}]"
            try:
                kind = _attribute("CU_POINTER_ATTRIBUTE_MEMORY_TYPE", address)
            except CudaError as exc:
                raise InvalidArgument(f"{where}: address {address:#x} is not memory CUDA knows ({exc}); "
                                      "expected a GPU address") from None
            if kind != int(driver.cu.CUmemorytype.CU_MEMORYTYPE_DEVICE):
                raise InvalidArgument(f"{where}: address {address:#x} is host memory, expected a GPU address "
                                      "(use put/get_into for host buffers)")
            start = _attribute("CU_POINTER_ATTRIBUTE_RANGE_START_ADDR", address)
            size = _attribute("CU_POINTER_ATTRIBUTE_RANGE_SIZE", address)
            if address + nbytes > start + size:
                raise InvalidArgument(f"{where}: {nbytes} bytes at {address:#x} run past the end of its GPU "
                                      f"allocation ({start:#x} + {size} bytes)")
            row.append(_attribute("CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL", address))
        ordinals.append(row)
    return ordinals


def copy_to_host(segments: Sequence[tuple[int, int]], ordinals: Sequence[int], host: np.ndarray) -> None:
    """Copy the segments, in order, into the contiguous host array ``host``."""
    base = host.__array_interface__["data"][0]
    offset = 0
    for (address, nbytes), ordinal in zip(segments, ordinals):
        _device(ordinal).enter()
        check(driver.cu.cuMemcpyDtoH(base + offset, address, nbytes), "cuMemcpyDtoH")
        offset += nbytes


def device_xxh64(segments: Sequence[tuple[int, int]], ordinals: Sequence[int], scratch: np.ndarray | None = None) -> int:
    """xxhash64 (seed 0, the ssd format's payload hash) of the block held in ``segments``."""
    total = sum(n for _, n in segments)
    host = scratch[:total] if scratch is not None and len(scratch) >= total else np.empty(total, dtype=np.uint8)
    copy_to_host(segments, ordinals, host)
    return xxhash.xxh64_intdigest(memoryview(host))


def synchronize(ordinals: Sequence[int]) -> None:
    """Wait for work queued on these GPUs (kvikio's compat path copies on the default stream)."""
    for ordinal in sorted(set(ordinals)):
        _device(ordinal).enter()
        check(driver.cu.cuCtxSynchronize(), "cuCtxSynchronize")
