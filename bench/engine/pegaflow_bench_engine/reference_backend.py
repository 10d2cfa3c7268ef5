"""pegaflow-llm (the reference system, PyPI ``pegaflow-llm-cu13``) as the engine's KV backend, so
the same workload runs against its Rust server side by side with pegaflow's daemon.

What its API allows, as read from the wheel's ``pegaflow.pyi`` and connector (0.25.1):

- server: ``pegaflow-server-py`` (found by ``pegaflow._bin_utils.find_binary``, run with
  ``binary_env()``: it embeds Python and needs libpython3.12 and torch to open IPC handles), flags
  ``--addr``, ``--pool-size``, ``--devices``, ``--http-addr``, ``--ssd-cache-path``,
  ``--ssd-cache-capacity``;
- client: ``EngineRpcClient(endpoint)`` with ``register_context_batch`` (per layer: a pickled
  ``ipc_wrapper.CudaIPCWrapper``, block count, bytes per block, K/V stride, segment count),
  ``query_prefetch`` -> ``QueryLoading`` | ``QueryReady(num_hit_blocks, lease)``, ``load`` (one
  completion flag for the whole batch in a ``PyLoadState`` shared-memory word: no per-layer
  completion, so ``wait_layer`` waits for the whole load), ``save`` (per layer lists of block ids
  and hashes), ``release``, ``unregister_context``, ``start_session_watcher``;
- GPU only: registration takes CUDA IPC handles (``device_id`` must be >= 0), so CPU runs refuse it.

Install it where it cannot shadow pegaflow's own ``pegaflow-server`` script, e.g.
``pip install --no-deps --target DIR pegaflow_llm_cu13-*.whl`` and ``PEGAFLOW_LLM_PATH=DIR``.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pegaflow_core.errors import PegaflowError
from pegaflow_core.launcher import free_port

from .kv_backend import Hit
from .kv_cache import PagedKVCache


def reference_module() -> Any:
    """The ``pegaflow`` package of pegaflow-llm (from PEGAFLOW_LLM_PATH when set)."""
    extra = os.environ.get("PEGAFLOW_LLM_PATH")
    if extra and extra not in sys.path:
        sys.path.insert(0, extra)
    try:
        import pegaflow

        importlib.import_module("pegaflow.pegaflow")  # the Rust extension, not only the Python part
    except ImportError as exc:
        raise PegaflowError(
            f"--backend reference needs pegaflow-llm ({exc}): pip install --no-deps --target DIR "
            "pegaflow_llm_cu13-0.25.1-cp312-cp312-manylinux_2_34_x86_64.whl and set PEGAFLOW_LLM_PATH=DIR"
        ) from None
    return pegaflow


class ReferenceServer:
    """pegaflow-llm's server process, started and stopped like our daemon."""

    backend_name = "reference"

    def __init__(self, dram: int, ssd_dir: str = "", ssd_capacity: int = 0, device: str = "cuda") -> None:
        self.dram, self.ssd_dir, self.ssd_capacity = dram, ssd_dir, ssd_capacity
        self.device_index = int(device.split(":")[1]) if ":" in device else 0
        self.endpoint = f"http://127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkdtemp(prefix="pegaflow-llm-")) / "server.log"

    def start(self, timeout_s: float = 180.0) -> ReferenceServer:
        ref = reference_module()
        from pegaflow._bin_utils import binary_env, find_binary

        args = [find_binary("pegaflow-server-py"), "--addr", self.endpoint.removeprefix("http://"),
                "--pool-size", f"{max(1, self.dram >> 20)}mb", "--devices", str(self.device_index),
                "--http-addr", f"127.0.0.1:{free_port()}"]
        if self.ssd_dir:
            # its SSD store is one file (a directory panics: "Is a directory")
            args += ["--ssd-cache-path", os.path.join(self.ssd_dir, "pegaflow-llm.cache"), "--ssd-cache-capacity", f"{max(1, self.ssd_capacity >> 20)}mb"]
        env = binary_env()
        if os.environ.get("PEGAFLOW_LLM_PATH"):
            env["PYTHONPATH"] = os.environ["PEGAFLOW_LLM_PATH"] + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise PegaflowError(f"pegaflow-llm server exited with {self.proc.returncode}:\n{self.log()}")
            try:  # its client connects when built: PegaFlowError until the server has bound its port
                ok, _ = ref.EngineRpcClient(self.endpoint).health()
                if ok:
                    return self
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise PegaflowError(f"pegaflow-llm server did not answer within {timeout_s:.0f}s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def backend(self) -> ReferenceBackend:
        return ReferenceBackend(self.endpoint)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ReferenceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ReferenceLoad:
    """One batch load; the server flips a shared-memory word when all of it is in place."""

    def __init__(self, state: Any, block_ids: Sequence[int]) -> None:
        self._state = state
        self._block_ids = tuple(block_ids)

    def wait_layer(self, layer: int) -> None:
        while not self._state.is_ready():
            time.sleep(20e-6)

    def finish(self) -> tuple[int, ...]:
        self.wait_layer(0)
        return () if self._state.get_state() >= 0 else self._block_ids


class ReferenceBackend:
    name = "reference"

    def __init__(self, endpoint: str, loading_timeout_s: float = 30.0, poll_interval_s: float = 0.002,
                 gqa_transfer: str = "direct") -> None:
        self.ref = reference_module()
        self.gqa_transfer = gqa_transfer  # its transfer backend for K/V caches ("direct" or "kernel"); MLA uses "kernel"
        self.client = self.ref.EngineRpcClient(endpoint)
        self.loading_timeout_s = loading_timeout_s
        self.poll_interval_s = poll_interval_s
        self.instance_id = ""
        self.layer_names: list[str] = []
        self.tp_rank = 0
        self.device_id = 0

    def register(self, cache: PagedKVCache, namespace: str, instance_id: str, shard: int = 0, tp_rank: int = 0,
                 tp_size: int = 1) -> None:
        if cache.device.type != "cuda":
            raise PegaflowError("pegaflow-llm registers CUDA IPC handles only: run --backend reference on a GPU")
        from pegaflow.ipc_wrapper import CudaIPCWrapper

        self.instance_id, self.tp_rank = instance_id, tp_rank
        self.device_id = cache.device.index or 0
        self.layer_names = [f"model.layers.{i}.attn" for i in range(len(cache.layers))]
        wrappers, per_block, kv_stride, segments = [], [], [], []
        for view in cache.layers:
            item = view.element_size()
            wrappers.append(pickle.dumps(CudaIPCWrapper(view)))
            if view.dim() == 5:  # [2, blocks, ...]: K and V are two segments of a block
                per_block.append(view.stride(1) * item)
                kv_stride.append(view.stride(0) * item)
                segments.append(2)
            else:  # MLA [blocks, block_size, latent]
                per_block.append(view.stride(0) * item)
                kv_stride.append(0)
                segments.append(1)
        n = len(self.layer_names)
        mla = cache.shape.attention == "mla"
        ok, message = self.client.register_context_batch(
            instance_id, namespace, tp_rank, 0, tp_size, tp_size, self.device_id, self.layer_names, wrappers,
            [cache.num_blocks] * n, per_block, kv_stride, segments, "kernel" if mla else self.gqa_transfer, False)
        if not ok:
            raise PegaflowError(f"pegaflow-llm register_context_batch: {message}")
        self.client.start_session_watcher(instance_id, namespace, tp_size, tp_size)

    def lookup(self, hashes: Sequence[bytes]) -> Hit:
        if not hashes:
            return Hit(0)
        started, queries, req_id = time.perf_counter(), 0, uuid.uuid4().hex
        while True:
            queries += 1
            reply = self.client.query_prefetch(self.instance_id, list(hashes), req_id)
            waited = time.perf_counter() - started
            if isinstance(reply, self.ref.QueryReady):
                if not reply.num_hit_blocks:
                    if reply.lease:
                        self.client.release(reply.lease)
                    return Hit(0, wait_s=waited if queries > 1 else 0.0, queries=queries)
                return Hit(reply.num_hit_blocks, reply.lease, waited if queries > 1 else 0.0, queries)
            if waited > self.loading_timeout_s:
                return Hit(0, queries=queries)
            time.sleep(self.poll_interval_s)

    def load(self, hit: Hit, block_ids: Sequence[int]) -> _ReferenceLoad:
        import torch

        torch.cuda.current_stream().synchronize()
        state = self.ref.PyLoadState()
        ok, message = self.client.load(self.instance_id, self.tp_rank, self.device_id, state.shm_name(),
                                       [self.layer_names], [(hit.lease, [list(block_ids)])])
        if not ok:
            raise PegaflowError(f"pegaflow-llm load: {message}")
        return _ReferenceLoad(state, block_ids)

    def save(self, block_ids: Sequence[int], hashes: Sequence[bytes]) -> int:
        if not block_ids:
            return 0
        import torch

        torch.cuda.current_stream().synchronize()
        saves = [(name, list(block_ids), list(hashes)) for name in self.layer_names]
        try:
            ok, _ = self.client.save(self.instance_id, self.tp_rank, 0, self.device_id, saves)
        except self.ref.PegaflowInternal:  # e.g. "pinned pool exhausted": a refused save, as a dropped one
            return 0
        return len(block_ids) if ok else 0

    def close(self) -> None:
        if self.instance_id:
            try:
                self.client.unregister_context(self.instance_id)
            except Exception:  # the server may be gone already; its session watcher cleans up
                pass
