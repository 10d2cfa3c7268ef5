"""How the daemon reaches an engine's KV memory: one RegionSpec per torch storage.

Shared by every connector (vLLM, SGLang) and the reference engine. Engines usually allocate the
whole KV cache as one flat buffer and hand every layer a strided view of it, so a worker normally
registers one region. Its kind depends on where the memory is:

- ``cuda_ipc``: GPU memory, exported with torch's CUDA IPC handle (the daemon opens it once, on
  the device with the same UUID, so differing CUDA_VISIBLE_DEVICES between engine and daemon
  do not matter);
- ``shm``: host memory that is a mapping of a file under /dev/shm (found in /proc/self/maps), so
  the daemon maps the same file;
- ``cma``: any other host memory (vLLM's CPU backend allocates with plain torch): the daemon
  copies with process_vm_readv/writev, which needs ptrace permission over this process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pegaflow_core.client import RegionSpec

log = logging.getLogger("pegaflow.regions")

SHM_ROOT = "/dev/shm/"


@dataclass(frozen=True)
class Region:
    """A region to register and where, inside it, the storage's first byte lies (plane offsets
    computed against the storage are shifted by ``base_offset``)."""

    spec: RegionSpec
    base_offset: int


def region_for_storage(tensor: Any, memory: str) -> Region:
    """The region covering ``tensor``'s whole storage. ``memory`` is the ``pegaflow.memory``
    option: auto, cma, shm or cuda_ipc."""
    storage = tensor.untyped_storage()
    address, nbytes = storage.data_ptr(), storage.nbytes()
    if tensor.device.type == "cuda":
        if memory not in ("auto", "cuda_ipc"):
            raise ValueError(f"pegaflow.memory={memory!r} cannot reach GPU memory; use auto or cuda_ipc")
        return _cuda_ipc_region(storage, tensor.device.index or 0)
    if tensor.device.type != "cpu":
        raise ValueError(f"pegaflow reaches KV caches on cpu or cuda, not {tensor.device}")
    if memory == "cuda_ipc":
        raise ValueError("pegaflow.memory='cuda_ipc' but the KV cache is in host memory")
    if memory in ("auto", "shm"):
        found = find_shm_mapping(address, nbytes)
        if found is not None:
            path, file_offset, file_size = found
            return Region(RegionSpec(nbytes=file_size, path=path, kind="shm"), file_offset)
        if memory == "shm":
            raise ValueError(
                f"pegaflow.memory='shm' but the KV cache at {address:#x} is not a mapping of a file under "
                f"{SHM_ROOT}; use 'auto' or 'cma'"
            )
    from pegaflow_core.cma import allow_daemon_access

    allow_daemon_access()  # Yama ptrace_scope=1: let the daemon (same user) attach to us
    return Region(RegionSpec(nbytes=nbytes, kind="cma", pid=os.getpid(), address=address), 0)


def find_shm_mapping(address: int, nbytes: int) -> tuple[str, int, int] | None:
    """If [address, address+nbytes) lies in one mapping of a /dev/shm file, return the file's
    path, the offset of ``address`` inside the file and the file's size."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith(SHM_ROOT):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if start <= address and address + nbytes <= end:
            path = parts[5].strip()
            if path.endswith(" (deleted)"):
                return None  # unlinked: the daemon could not open it
            try:
                size = os.stat(path).st_size
            except OSError:
                return None
            return path, int(parts[2], 16) + (address - start), size
    return None


def _cuda_ipc_region(storage: Any, device: int) -> Region:
    """Export the CUDA allocation holding ``storage``. torch's IPC handle names the whole
    cudaMalloc block; ``offset`` says where the storage starts inside it, so the region is the
    block from its start and plane offsets shift by that amount; ``address`` is that start in this
    process."""
    import torch  # only reached with a CUDA tensor in hand

    shared = storage._share_cuda_()
    # (device, handle, storage_size_bytes, storage_offset_bytes, ref_counter_handle, ...)
    handle, size, offset = _raw_ipc_handle(bytes(shared[1])), int(shared[2]), int(shared[3])
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    start = storage.data_ptr() - offset  # the allocation's start here: the engine-side load copies there
    return Region(RegionSpec(nbytes=offset + size, kind="cuda_ipc", handle=handle, device=device, device_uuid=uuid,
                             address=start), offset)


_IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)


def _raw_ipc_handle(shared: bytes) -> bytes:
    """The cudaIpcMemHandle_t inside torch's shareable handle. torch prefixes it with a version
    byte and a type byte ('c': a cudaMalloc block); its expandable segments ('e') are shared by
    another mechanism that a CUDA IPC handle cannot open."""
    if len(shared) == _IPC_HANDLE_BYTES:
        return shared
    if len(shared) == _IPC_HANDLE_BYTES + 2 and shared[1:2] == b"c":
        return shared[2:]
    if len(shared) > 1 and shared[1:2] == b"e":
        raise ValueError(
            "the KV cache lives in a torch expandable segment, which cannot be exported as a CUDA IPC handle: "
            "start the engine with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False"
        )
    raise ValueError(f"unrecognised torch CUDA IPC handle ({len(shared)} bytes, starting {shared[:2]!r})")
