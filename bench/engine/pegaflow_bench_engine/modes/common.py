"""What the modes share: the KV server a run talks to (pegaflow's daemon or pegaflow-llm's server)
and the in-process engine."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from ..bench import Settings
from ..kv_backend import KVBackend, PegaflowBackend
from .. import daemons


class KVServer:
    """A KV server process the benchmark owns: start, kill -9, start again, stop."""

    backend_name = "pegaflow"

    def __init__(self, settings: Settings, dram: int, ssd_dir: str = "", ssd_capacity: int = 0,
                 pool_name: str | None = None, shm_dir: str | None = None) -> None:
        block = settings.shape.block_bytes
        if ssd_dir:
            config = daemons.ssd_config(dram, ssd_dir, ssd_capacity, block)
        else:
            config = daemons.dram_config(dram, block, pool_name=pool_name, shm_dir=shm_dir)
        from pegaflow_core.launcher import DaemonProcess

        self._daemon = DaemonProcess(config)
        self.endpoint = self._daemon.endpoint

    def start(self) -> KVServer:
        from pegaflow_core.client import PegaflowClient

        self._daemon.start(timeout_s=120)
        with PegaflowClient(self.endpoint, timeout_s=30) as client:
            client.wait_warm()
        return self

    def backend(self) -> KVBackend:
        return PegaflowBackend(self.endpoint)

    def kill(self) -> None:
        self._daemon.kill()

    def stats(self) -> dict[str, Any]:
        from pegaflow_core.client import PegaflowClient

        with PegaflowClient(self.endpoint, timeout_s=10) as client:
            reply = client.stats()
        return {"index_blocks": reply.index_blocks, "counters": dict(reply.counters)}

    def close(self) -> None:
        self._daemon.close()

    def __enter__(self) -> KVServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def kv_server(settings: Settings, dram: int, ssd_dir: str = "", ssd_capacity: int = 0) -> Any:
    """The server for ``settings.backend``: pegaflow's daemon or pegaflow-llm's Rust server, with an
    SSD tier under the DRAM one when ``ssd_dir`` is given."""
    if settings.backend == "reference":
        from ..reference_backend import ReferenceServer

        return ReferenceServer(dram, ssd_dir, ssd_capacity, device=settings.device)
    return KVServer(settings, dram, ssd_dir, ssd_capacity)


@contextlib.contextmanager
def ssd_directory(settings: Settings) -> Iterator[str]:
    """``--ssd-dir``, or a temporary directory on a disk (not tmpfs) removed afterwards."""
    if settings.ssd_dir:
        yield settings.ssd_dir
        return
    path = tempfile.mkdtemp(prefix="pegaflow-bench-ssd-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def shape_dict(settings: Settings) -> dict[str, Any]:
    return dataclasses.asdict(settings.shape)


def device(settings: Settings) -> Any:
    import torch

    return torch.device(settings.device)
