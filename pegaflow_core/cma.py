"""Cross-memory attach: the daemon reads and writes KV memory inside an engine process.

CPU engines such as vLLM's CPU backend allocate their KV cache with plain torch, in memory the
daemon cannot map. Linux's process_vm_readv / process_vm_writev copy between two processes'
address spaces in one system call per batch of up to IOV_MAX segments, with no shared file and no
extra copy. The daemon needs ptrace permission over the engine (same user; with Yama's
ptrace_scope=1 the engine must also opt in, which ``allow_daemon_access`` does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

import numpy as np

from .errors import InvalidArgument, PegaflowError

IOV_MAX = 1024
_PR_SET_PTRACER = 0x59616D61
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
_libc.process_vm_writev.restype = ctypes.c_ssize_t
_libc.process_vm_writev.argtypes = _libc.process_vm_readv.argtypes


def transfer(pid: int, local: np.ndarray, remote: np.ndarray, length: np.ndarray, write: bool) -> None:
    """Copy ``length[i]`` bytes between ``local[i]`` (this process) and ``remote[i]`` (process
    ``pid``): into the engine when ``write``, out of it otherwise. Arrays are uint64 addresses."""
    call = _libc.process_vm_writev if write else _libc.process_vm_readv
    n = local.size
    for lo in range(0, n, IOV_MAX):
        hi = min(n, lo + IOV_MAX)
        count = hi - lo
        local_iov = np.empty((count, 2), dtype=np.uint64)
        remote_iov = np.empty((count, 2), dtype=np.uint64)
        local_iov[:, 0], local_iov[:, 1] = local[lo:hi], length[lo:hi]
        remote_iov[:, 0], remote_iov[:, 1] = remote[lo:hi], length[lo:hi]
        expected = int(length[lo:hi].sum())
        done = call(pid, local_iov.ctypes.data, count, remote_iov.ctypes.data, count, 0)
        if done != expected:
            err = ctypes.get_errno()
            reason = os.strerror(err) if done < 0 else f"moved {done} of {expected} bytes"
            raise PegaflowError(f"{'writing to' if write else 'reading from'} process {pid} failed: {reason}")


def check_access(pid: int, address: int, nbytes: int) -> None:
    """Raise InvalidArgument unless the daemon can read the first and last byte of the region."""
    if pid <= 0 or address <= 0 or nbytes <= 0:
        raise InvalidArgument(f"a cma region needs pid, address and nbytes > 0, got pid={pid} address={address:#x} nbytes={nbytes}")
    probe = np.zeros(1, dtype=np.uint8)
    for remote_address in (address, address + nbytes - 1):
        local_iov = np.array([probe.ctypes.data, 1], dtype=np.uint64)  # kept alive across the call
        remote_iov = np.array([remote_address, 1], dtype=np.uint64)
        done = _libc.process_vm_readv(pid, local_iov.ctypes.data, 1, remote_iov.ctypes.data, 1, 0)
        if done != 1:
            err = ctypes.get_errno()
            hint = {
                errno.EPERM: "the daemon may not trace that process: run both as the same user, and have the engine "
                "call pegaflow_core.cma.allow_daemon_access() where Yama's ptrace_scope is 1",
                errno.ESRCH: "no such process (is the engine on another machine or in another PID namespace?)",
                errno.EFAULT: "the address range is not mapped in that process",
            }.get(err, os.strerror(err))
            raise InvalidArgument(f"cannot access {nbytes} bytes at {address:#x} in process {pid}: {os.strerror(err)}; {hint}")


def allow_daemon_access() -> None:
    """Engine side: let other processes of this user (the daemon) attach to this one, for kernels
    with Yama ptrace_scope=1. A no-op where Yama is absent."""
    _libc.prctl(_PR_SET_PTRACER, ctypes.c_ulong(_PR_SET_PTRACER_ANY), 0, 0, 0)
