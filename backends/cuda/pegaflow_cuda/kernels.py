"""The copy kernel, compiled at first use with NVRTC for the device at hand.

One kernel serves both directions and every layout: it copies a table of segments (destination,
source, length), one thread block per segment, in 16-byte words with four loads in flight per
thread. Segments are whole planes of a block (32 KiB for Llama-8B, 18-72 KiB for MLA) moving
between the engine's blocks and a staging buffer in GPU memory (lanes.py): device to device, so a
launch of thousands of scattered segments runs at memory speed (~500 GB/s on an H100), and PCIe
only ever sees the copy engines' large DMA pieces.
"""

from __future__ import annotations

import threading
from typing import Any

from . import driver
from .driver import Device, check

SOURCE = rb"""
typedef unsigned long long u64;

extern "C" __global__ void pegaflow_copy_segments(const u64* __restrict__ table, int n)
{
    // table: n destinations, then n sources, then n lengths
    for (int s = blockIdx.x; s < n; s += gridDim.x) {
        char* dst = (char*)table[s];
        const char* src = (const char*)table[n + s];
        const u64 len = table[2 * n + s];
        const unsigned step = blockDim.x;
        if ((((u64)dst | (u64)src | len) & 15) == 0) {
            uint4* d = (uint4*)dst;
            const uint4* q = (const uint4*)src;
            const u64 words = len >> 4;
            u64 i = threadIdx.x;
            for (; i + 3 * step < words; i += 4 * step) {
                const uint4 a = q[i], b = q[i + step], c = q[i + 2 * step], e = q[i + 3 * step];
                d[i] = a; d[i + step] = b; d[i + 2 * step] = c; d[i + 3 * step] = e;
            }
            for (; i < words; i += step) d[i] = q[i];
        } else {
            for (u64 i = threadIdx.x; i < len; i += step) dst[i] = src[i];
        }
    }
}
"""

THREADS = 256
_lock = threading.Lock()
_functions: dict[int, Any] = {}


def copy_function(device: Device) -> Any:
    """The compiled kernel for ``device`` (its context must be current)."""
    with _lock:
        found = _functions.get(device.ordinal)
        if found is None:
            found = _functions[device.ordinal] = _compile(device)
        return found


def _compile(device: Device) -> Any:
    nv = driver.nvrtc
    program = check(nv.nvrtcCreateProgram(SOURCE, b"pegaflow_copy.cu", 0, [], []), "nvrtcCreateProgram")
    major, minor = device.capability
    options = [f"--gpu-architecture=sm_{major}{minor}".encode()]
    (err,) = nv.nvrtcCompileProgram(program, len(options), options)
    if int(err) != 0:
        size = check(nv.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize")
        log = b" " * size
        nv.nvrtcGetProgramLog(program, log)
        text = log.rstrip(b"\0 ").decode(errors="replace")
        raise driver.CudaError(f"compiling the copy kernel for sm_{major}{minor} failed: {text}")
    size = check(nv.nvrtcGetCUBINSize(program), "nvrtcGetCUBINSize")
    cubin = b" " * size
    check(nv.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
    nv.nvrtcDestroyProgram(program)
    module = check(driver.cu.cuModuleLoadData(cubin), "cuModuleLoadData")
    return check(driver.cu.cuModuleGetFunction(module, b"pegaflow_copy_segments"), "cuModuleGetFunction")
