"""The engine-side load: the engine's own process maps the daemon's pool and copies a lease's
blocks into its KV cache, while the daemon keeps the index, leases, eviction and saves.

Why: on a GPU the daemon's copy kernels and the engine's forward are two CUDA contexts, and the
GPU time-slices them, so a load the daemon runs while the engine computes layer by layer lands
7-8 ms later than alone (H100, 10K-token prompt). The same copy on the engine's own streams
overlaps with its kernels like any two streams of one context (docs/benchmarks.md, session 6).

How: registration answers with the pool file (``SharedPool``); the client maps it read-only
here and asks the engine's memory kind for a loader (``EngineMemory.engine_loader``). A load
then asks ``Locate`` where the lease's blocks are, copies them with the loader on its own thread,
reports layers as they land, and releases the lease. Anything the daemon must do first (promote
from a lower tier, verify a recovered block) answers -1 there, and that load goes to the daemon
as before; so does every load while the loader is not ready or after it failed once.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from .contexts import EngineRegion
from .errors import PegaflowError, PluginError
from .layout import KVLayout
from .tier import SharedPool

if TYPE_CHECKING:
    from .client import ContextSpec, LoadResult

log = logging.getLogger("pegaflow.engine_copy")

_MADV_POPULATE_READ = 22  # Linux 5.14; not in Python 3.11's mmap module


class MappedPool:
    """The daemon's pool file mapped read-only in this process: the engine may read every block
    of it (the file's permissions decide who may), never write."""

    def __init__(self, pool: SharedPool) -> None:
        fd = os.open(pool.path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < pool.data_offset + pool.data_bytes:
                raise PegaflowError(f"pool file {pool.path} has {size} bytes, the daemon says its data region ends at "
                                    f"{pool.data_offset + pool.data_bytes}")
            self._mmap = mmap.mmap(fd, pool.data_offset + pool.data_bytes, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.pool = pool
        self.nbytes = pool.data_bytes
        self.address = int(np.frombuffer(self._mmap, dtype=np.uint8).ctypes.data) + pool.data_offset

    def populate(self, start: int, nbytes: int) -> None:
        """Fault ``[start, start + nbytes)`` of the data region into this mapping now (Linux 5.14's
        MADV_POPULATE_READ; a no-op where missing), so a later page-locking finds it present."""
        try:
            self._mmap.madvise(_MADV_POPULATE_READ, self.pool.data_offset + start, nbytes)
        except OSError:
            pass

    def close(self) -> None:
        self._mmap.close()


class EngineLoader:
    """A memory kind's copy from the mapped pool into the engine's KV memory, in the engine's
    process. Subclasses implement ``copy``, set ``ready`` once they can run it (a GPU loader
    registers the mapping with CUDA first, in the background) and then ``settled`` (also when
    they give up), and release their own resources in ``close``."""

    def __init__(self, spec: ContextSpec, pool: SharedPool) -> None:
        self.layout = KVLayout(spec.num_blocks, spec.num_layers, tuple(spec.planes))
        # The engine's own addresses of its regions (RegionSpec.address): what it copies into.
        self.regions = [EngineRegion(r.kind, r.nbytes, r.address, device=r.device) for r in spec.regions]
        self.pool = MappedPool(pool)
        self.ready = False
        self.settled = threading.Event()  # set by the subclass once ``ready`` or once it never will be
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pegaflow-engine-load")

    def copy(self, block_ids: Sequence[int], offsets: np.ndarray, on_layer: Callable[[int], None]) -> None:
        """Copy the stored blocks at ``offsets`` (in the pool's data region) into engine blocks
        ``block_ids``, layer by layer; ``on_layer(k)`` once layers [0, k) are in. Returns when all are."""
        raise NotImplementedError

    def start(self, block_ids: Sequence[int], offsets: np.ndarray, num_layers: int, block_bytes: int,
              after: Callable[[], None] | None = None) -> EngineLoad:
        """Run ``copy`` on the loader's thread (loads in order); ``after`` runs once it ended."""
        load = EngineLoad(num_layers)
        self._executor.submit(self._run, load, list(block_ids), offsets, block_bytes, after)
        return load

    def _run(self, load: EngineLoad, block_ids: list[int], offsets: np.ndarray, block_bytes: int,
             after: Callable[[], None] | None) -> None:
        from .client import LoadResult

        try:
            self.copy(block_ids, offsets, load.layer)
            load.finish(LoadResult((), len(block_ids) * block_bytes))
        except Exception as exc:
            self.ready = False  # later loads go to the daemon
            log.warning("engine-side load of %d blocks failed (%s); the engine recomputes them, and the daemon "
                        "copies later loads", len(block_ids), exc)
            load.fail(PegaflowError(f"engine-side load failed: {exc}"))
        finally:
            if after is not None:
                after()

    def close(self) -> None:
        """Wait for loads in flight, then unmap (subclasses release theirs first)."""
        self.ready = False
        self._executor.shutdown(wait=True)
        self.pool.close()


class EngineLoad:
    """A load the engine's process runs itself; the same calls as ``client.LoadHandle``."""

    def __init__(self, num_layers: int) -> None:
        self._done = threading.Condition()
        self.layers_done = 0
        self.num_layers = num_layers
        self.result: LoadResult | None = None
        self._error: PegaflowError | None = None

    def wait_layer(self, layer: int) -> None:
        with self._done:
            self._done.wait_for(lambda: self.layers_done > layer or self.result is not None or self._error is not None)
        if self._error is not None:
            raise self._error

    def wait(self) -> LoadResult:
        with self._done:
            self._done.wait_for(lambda: self.result is not None or self._error is not None)
        if self._error is not None:
            raise self._error
        assert self.result is not None
        return self.result

    # -- from the loader's thread ------------------------------------------------------------------
    def layer(self, done: int) -> None:
        with self._done:
            self.layers_done = max(self.layers_done, done)
            self._done.notify_all()

    def finish(self, result: LoadResult) -> None:
        with self._done:
            self.layers_done, self.result = self.num_layers, result
            self._done.notify_all()

    def fail(self, error: PegaflowError) -> None:
        with self._done:
            self._error = error
            self._done.notify_all()


def open_engine_loader(spec: ContextSpec, pool: SharedPool) -> EngineLoader | None:
    """The loader of ``spec``'s memory kind for ``pool``, or None when the kind has none or it
    cannot start here (logged: loads then go to the daemon, as they always could)."""
    if not spec.regions or len({r.kind for r in spec.regions}) != 1:
        return None
    from .plugins import get_registry

    kind = spec.regions[0].kind
    try:
        memory = get_registry().get("memory", kind)
    except PluginError:
        return None
    try:
        return memory.engine_loader(spec, pool)
    except (OSError, PegaflowError) as exc:
        log.warning("pegaflow: cannot load blocks in this process from the daemon's pool %s (%s); the daemon "
                    "copies them", pool.path, exc)
        return None
