"""kvikio (RAPIDS' cuFile binding), loaded lazily and configured once per process.

Why a module of its own: kvikio's settings (compat mode, thread pool) are process-wide, its
native library must be loaded (``libkvikio.load_library()``, which also finds libcufile) before
``import kvikio``, and whether real GDS runs depends on the machine (the nvidia-fs kernel module,
cuFile's driver, the file system), so what ``pegaflow backends`` and the tier say about it comes
from one place.

Facts this relies on (kvikio 26.10): without an NVIDIA driver kvikio imports but every file I/O
fails ("libcuda.so.1: cannot open shared object file"), compat mode included; ``CompatMode.AUTO``
uses cuFile when its driver opens and POSIX I/O with a host bounce buffer otherwise, and
``defaults.is_compat_mode_preferred()`` says which one it picked.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from pegaflow_core.errors import PegaflowError

NVIDIA_FS = "/proc/driver/nvidia-fs"
INSTALL_HINT = "pip install 'pegaflow-gds[cu13]' (or [cu12], matching the driver's CUDA major version)"


class GdsUnavailable(PegaflowError):
    """kvikio or the GPU it needs cannot run here; the message says why."""


@dataclass(frozen=True)
class IOMode:
    """How GPU file I/O runs in this process."""

    gds: bool  # True: cuFile moves data between the file and GPU memory; False: kvikio's compat mode
    detail: str  # why, for `pegaflow backends`, logs and `io_detail`
    version: str


_lock = threading.Lock()
_module: Any = None
_probe: IOMode | GdsUnavailable | None = None


def kvikio() -> Any:
    """The kvikio module, its native library loaded first; GdsUnavailable when it cannot load."""
    global _module
    with _lock:
        if _module is None:
            try:
                import libkvikio

                libkvikio.load_library()
                import kvikio as module
                import kvikio.defaults  # noqa: F401 - the settings API used below
            except ImportError as exc:
                raise GdsUnavailable(f"kvikio is not installed ({exc}); {INSTALL_HINT}") from None
            except Exception as exc:  # load_library raises its own errors for a missing libcufile
                raise GdsUnavailable(f"kvikio's native library does not load: {exc}") from None
            _module = module
        return _module


def _nvidia_fs_reason() -> str:
    if not os.path.exists(NVIDIA_FS):
        return "the nvidia-fs kernel module is not loaded (no /proc/driver/nvidia-fs)"
    return "cuFile's driver did not open although nvidia-fs is loaded (see cufile.log and /etc/cufile.json)"


def configure(compat: str, threads: int) -> IOMode:
    """Apply the ``compat`` and ``threads`` options (process-wide) and return the resulting mode.
    ``compat: off`` raises GdsUnavailable where real GDS cannot run."""
    kv = kvikio()
    mode = probe()
    if isinstance(mode, GdsUnavailable):
        raise mode
    wanted = {"auto": kv.CompatMode.AUTO, "on": kv.CompatMode.ON, "off": kv.CompatMode.OFF}[compat]
    if compat == "off" and not mode.gds:
        raise GdsUnavailable(f"compat: 'off' requires GPUDirect Storage, but {mode.detail}; "
                             "set compat: auto to run in compat mode")
    kv.defaults.set({"compat_mode": wanted, "num_threads": threads})
    if compat == "on" and mode.gds:
        return IOMode(False, f"compat mode (compat: on), kvikio {mode.version}, {threads} threads", mode.version)
    return IOMode(mode.gds, f"{mode.detail}, {threads} threads", mode.version)


def probe() -> IOMode | GdsUnavailable:
    """Whether kvikio can move file data to and from GPU memory here, and how; checked once.

    Loads kvikio, initialises the CUDA driver, then writes and reads back one page of host memory
    through kvikio in a temporary file (the cheapest call that fails the way real I/O would)."""
    global _probe
    if _probe is not None:
        return _probe
    try:
        kv = kvikio()
        version = str(getattr(kv, "__version__", "?"))
        from pegaflow_cuda import driver

        try:
            count = driver.device_count()
        except driver.CudaError as exc:
            raise GdsUnavailable(f"kvikio {version} loads, but its file I/O needs an NVIDIA GPU and driver, "
                                 f"even in compat mode: {exc}") from None
        if count == 0:
            raise GdsUnavailable(f"kvikio {version} loads, but no CUDA device is visible")
        previous = kv.defaults.get("compat_mode")
        kv.defaults.set({"compat_mode": kv.CompatMode.AUTO})
        gds = not kv.defaults.is_compat_mode_preferred()
        kv.defaults.set({"compat_mode": previous})
        _round_trip(kv)
        if gds:
            detail = f"GPUDirect Storage (cuFile with nvidia-fs), kvikio {version}"
        else:
            detail = f"compat mode (POSIX I/O through a host bounce buffer), kvikio {version}: {_nvidia_fs_reason()}"
        _probe = IOMode(gds, detail, version)
    except GdsUnavailable as exc:
        _probe = exc
    except Exception as exc:  # a probe must answer, never raise
        _probe = GdsUnavailable(f"kvikio file I/O failed: {exc}")
    return _probe


def _round_trip(kv: Any) -> None:
    import numpy as np

    data = np.frombuffer(os.urandom(4096), dtype=np.uint8)
    back = np.zeros(4096, dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="pegaflow-gds-probe-") as tmp:
        path = os.path.join(tmp, "probe")
        handle = kv.CuFile(path, "w+")
        try:
            handle.pwrite(data, file_offset=0).get()
            handle.pread(back, file_offset=0).get()
        finally:
            handle.close()
    if not np.array_equal(data, back):
        raise GdsUnavailable("kvikio read back other bytes than it wrote in a probe file")


class DeviceBuffer:
    """A raw GPU address range in the form kvikio accepts (``__cuda_array_interface__``), so no
    cupy or torch object is needed around the engine's memory."""

    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (address, False), "strides": None, "version": 3,
        }
