"""The CUDA driver API through cuda-bindings, reduced to what the copy path needs.

The driver API (not the runtime) because the daemon opens other processes' allocations with IPC
handles and runs its own kernels, and both want explicit contexts: every thread that calls in
first makes the device's primary context current (``Device.enter``), which is also the context
the DRAM tier's cudaHostRegister used, so pinned pool memory is visible to our kernels.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

import numpy as np

from pegaflow_core.errors import PegaflowError


log = logging.getLogger("pegaflow.cuda")


class CudaError(PegaflowError):
    """A CUDA driver or NVRTC call failed; the message names the call and the CUDA error."""


def _bindings() -> tuple[Any, Any]:
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError:
        try:
            from cuda import cuda as driver, nvrtc  # type: ignore[no-redef]  # cuda-python < 12.6
        except ImportError:
            raise CudaError("cuda-bindings is not installed (pip install cuda-bindings)") from None
    return driver, nvrtc


cu, nvrtc = None, None  # bound by init()
_init_lock = threading.Lock()
_initialised = False


def init() -> None:
    """Load the bindings and cuInit once; CudaError says why the driver is unusable."""
    global cu, nvrtc, _initialised
    with _init_lock:
        if _initialised:
            return
        cu, nvrtc = _bindings()
        try:
            (err,) = cu.cuInit(0)
        except RuntimeError as exc:  # libcuda.so itself is missing (no NVIDIA driver installed)
            raise CudaError(f"no NVIDIA driver: {exc}") from None
        if int(err) != 0:
            raise CudaError(f"cuInit: {_name(err)} (no usable NVIDIA GPU or driver)")
        _initialised = True


def _name(err: Any) -> str:
    try:
        found, name = cu.cuGetErrorName(err)
        if int(found) == 0:
            return name.decode()
    except Exception:
        pass
    return str(err)


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-bindings ``(err, *values)`` tuple; CudaError naming ``what`` on failure."""
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if int(err) != 0:
        raise CudaError(f"{what}: {_name(err) if isinstance(err, cu.CUresult) else err}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def normalise_uuid(uuid: str | bytes) -> str:
    """Lowercase hex digits of a GPU UUID, from torch's ``str(props.uuid)``, nvidia-smi's
    ``GPU-xxxxxxxx-...`` or the driver's 16 raw bytes: all compare equal."""
    if isinstance(uuid, bytes):
        return uuid.hex()
    text = uuid.strip().lower().removeprefix("gpu-")
    return "".join(ch for ch in text if ch in "0123456789abcdef")


class Device:
    """One GPU as the daemon uses it: ordinal, primary context and the attributes the copy path
    depends on."""

    def __init__(self, ordinal: int) -> None:
        init()
        self.ordinal = ordinal
        self.handle = check(cu.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
        self.context = check(cu.cuDevicePrimaryCtxRetain(self.handle), "cuDevicePrimaryCtxRetain")
        self.name = device_name(ordinal)
        attr = cu.CUdevice_attribute
        self.capability = (
            check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.handle), "attribute"),
            check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.handle), "attribute"),
        )
        self.sm_count = check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, self.handle), "attribute")

    def enter(self) -> None:
        """Make this device's primary context current in the calling thread."""
        check(cu.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def close(self) -> None:
        check(cu.cuDevicePrimaryCtxRelease(self.handle), "cuDevicePrimaryCtxRelease")


def device_name(ordinal: int) -> str:
    """The GPU's name, without creating a context on it (``pegaflow backends`` only asks)."""
    init()
    handle = check(cu.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
    return check(cu.cuDeviceGetName(256, handle), "cuDeviceGetName").split(b"\0", 1)[0].decode()


def device_count() -> int:
    init()
    return check(cu.cuDeviceGetCount(), "cuDeviceGetCount")


def find_device(uuid: str, ordinal: int) -> int:
    """This process's ordinal of the GPU with ``uuid`` (or ``ordinal`` when no UUID is given)."""
    count = device_count()
    if not uuid:
        if not 0 <= ordinal < count:
            raise CudaError(f"device {ordinal} does not exist here ({count} visible GPU(s)) and no device_uuid was given")
        return ordinal
    wanted = normalise_uuid(uuid)
    seen = []
    for i in range(count):
        handle = check(cu.cuDeviceGet(i), "cuDeviceGet")
        found = normalise_uuid(bytes(check(cu.cuDeviceGetUuid(handle), "cuDeviceGetUuid").bytes))
        if found == wanted:
            return i
        seen.append(found)
    raise CudaError(f"GPU {uuid} is not visible to the daemon (it sees {seen or 'no GPU'}; check CUDA_VISIBLE_DEVICES)")


class _CopyAttributes(ctypes.Structure):
    """CUmemcpyAttributes: source access order, source and destination location hints, flags."""

    _fields_ = [("src_access_order", ctypes.c_int), ("src_location", ctypes.c_int * 2),
                ("dst_location", ctypes.c_int * 2), ("flags", ctypes.c_uint)]


_SRC_ACCESS_ORDER_STREAM = 1
_P = ctypes.c_void_p


class BatchCopier:
    """Many copies in one driver call (cuMemcpyBatchAsync, CUDA 12.8+): the copy engines run them
    back to back at the DMA ceiling, and Python pays one call per batch, not one per copy.

    Bound with ctypes against libcuda because the arrays are numpy's already (cuda-bindings would
    want one Python object per address). Drivers without the call get one cuMemcpyAsync per copy.
    """

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        self._one = lib.cuMemcpyAsync
        self._one.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, _P]
        self._attrs = _CopyAttributes(src_access_order=_SRC_ACCESS_ORDER_STREAM)
        self._attrs_index = (ctypes.c_size_t * 1)(0)
        self._fail_index = ctypes.c_size_t(0)
        self._batch, self._with_fail_index = None, False
        if hasattr(lib, "cuMemcpyBatchAsync_v2"):  # CUDA 13: no failIdx argument
            self._batch = lib.cuMemcpyBatchAsync_v2
            self._batch.argtypes = [_P, _P, _P, ctypes.c_size_t, _P, _P, ctypes.c_size_t, _P]
        elif hasattr(lib, "cuMemcpyBatchAsync"):  # CUDA 12.8/12.9
            self._batch, self._with_fail_index = lib.cuMemcpyBatchAsync, True
            self._batch.argtypes = [_P, _P, _P, ctypes.c_size_t, _P, _P, ctypes.c_size_t, _P, _P]
        else:
            log.warning("this CUDA driver has no cuMemcpyBatchAsync: GPU copies go one cuMemcpyAsync each (slower)")
        if self._batch is not None:
            self._batch.restype = ctypes.c_int
        self._one.restype = ctypes.c_int

    @property
    def batched(self) -> bool:
        return self._batch is not None

    def copy(self, dst: np.ndarray, src: np.ndarray, size: np.ndarray, stream: int) -> None:
        """Enqueue ``size[i]`` bytes from ``src[i]`` to ``dst[i]`` on ``stream`` (uint64 arrays,
        contiguous; any mix of device and pinned host addresses)."""
        n = dst.size
        if n == 0:
            return
        if self._batch is None:
            for d, s, k in zip(dst.tolist(), src.tolist(), size.tolist()):
                _check_result(self._one(d, s, k, stream), "cuMemcpyAsync")
            return
        args = [dst.ctypes.data, src.ctypes.data, size.ctypes.data, n, ctypes.byref(self._attrs), self._attrs_index, 1]
        if self._with_fail_index:
            args.append(ctypes.byref(self._fail_index))
        _check_result(self._batch(*args, stream), f"cuMemcpyBatchAsync({n} copies)")


def _check_result(code: int, what: str) -> None:
    if code != 0:
        raise CudaError(f"{what}: {_name(cu.CUresult(code))}")
