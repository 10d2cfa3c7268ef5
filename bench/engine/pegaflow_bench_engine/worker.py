"""An engine rank in its own process, driven over its stdin/stdout with one JSON object per line.

Multi-engine and restart benchmarks need real processes: engines that share one daemon, TP ranks,
an engine killed with SIGKILL and started again. ``EngineProcess`` starts one
(``python -m pegaflow_bench_engine.worker SPEC``), waits for its ``ready`` line (the time from
launch to that line is the engine's start-to-ready time: interpreter, torch and CUDA init,
weights, KV cache allocation, registration with the daemon) and sends it requests:

- ``{"op": "prefill", "tokens": [...]}`` -> one prefill's figures;
- ``{"op": "run", "prompts": [[...], ...]}`` -> every prompt in order, figures per prompt and the
  wall time of the whole run (used for concurrent throughput);
- ``{"op": "exit"}``.

Everything the engine logs goes to stderr; stdout carries only the protocol.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pegaflow_core.launcher import die_with_parent, die_with_parent_env

STARTED = time.perf_counter()


@dataclass(frozen=True)
class EngineSpec:
    """Everything an engine process needs; JSON-serialisable."""

    shape: dict[str, Any]
    backend: str  # "pegaflow", "none" or "reference"
    endpoint: str = ""
    device: str = "cpu"
    kv_blocks: int = 64
    seed: int = 0
    tied: bool = False
    instance_id: str = "engine-0"
    tp_rank: int = 0
    tp_size: int = 1
    save: bool = True
    graphs: bool = True  # short suffixes replay CUDA graphs (graphs.py)
    warmup_tokens: int = 0  # one uncounted prefill (no backend) before "ready": kernels and allocator warm
    extra: dict[str, Any] = field(default_factory=dict)


class EngineProcess:
    """The parent's handle on one engine process."""

    def __init__(self, spec: EngineSpec, log_path: Path | None = None) -> None:
        self.spec = spec
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] = {}
        self.start_to_ready_s = 0.0
        self._lines: queue.Queue[str] = queue.Queue()

    def start(self, timeout_s: float = 600.0) -> EngineProcess:
        return self.launch().wait_ready(timeout_s)

    def launch(self) -> EngineProcess:
        """Start the process without waiting (several engines start in parallel, as on a server)."""
        stderr = open(self.log_path, "a") if self.log_path else subprocess.DEVNULL
        self._launched = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pegaflow_bench_engine.worker", json.dumps(asdict(self.spec))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1,
            env=die_with_parent_env(signal.SIGKILL),  # no engine is left holding a GPU
        )
        if stderr is not subprocess.DEVNULL:
            stderr.close()
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()
        return self

    def wait_ready(self, timeout_s: float = 600.0) -> EngineProcess:
        self.ready = self._read(timeout_s)
        self.start_to_ready_s = time.perf_counter() - self._launched
        if self.ready.get("event") != "ready":
            raise RuntimeError(f"engine {self.spec.instance_id} sent {self.ready!r} instead of 'ready'")
        return self

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout_s: float = 600.0) -> dict[str, Any]:
        reply = self._read(timeout_s)
        if "error" in reply:
            raise RuntimeError(f"engine {self.spec.instance_id}: {reply['error']}")
        return reply

    def request(self, message: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
        self.send(message)
        return self.receive(timeout_s)

    def _pump(self, stream: TextIO) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put("")

    def _read(self, timeout_s: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            line = ""
        if not line:
            code = self.proc.poll()
            tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path and self.log_path.exists() else ""
            raise RuntimeError(f"engine {self.spec.instance_id} gave no answer within {timeout_s:.0f}s "
                               f"(exit code {code}); its log ends:\n{tail}")
        return json.loads(line)

    def kill(self) -> None:
        """kill -9: an engine crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def close(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.send({"op": "exit"})
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()


def build_engine(spec: EngineSpec) -> Any:
    """The Engine a spec describes (imports torch: runs in the engine process)."""
    import torch

    from .engine import Engine
    from .kv_backend import NoBackend, PegaflowBackend
    from .shapes import ModelShape

    device = torch.device(spec.device)
    if spec.backend == "pegaflow":
        backend: Any = PegaflowBackend(spec.endpoint)
    elif spec.backend == "reference":
        from .reference_backend import ReferenceBackend

        backend = ReferenceBackend(spec.endpoint)
    elif spec.backend == "none":
        backend = NoBackend()
    else:
        raise ValueError(f"backend must be 'pegaflow', 'reference' or 'none', got {spec.backend!r}")
    return Engine(ModelShape(**spec.shape), backend, device, spec.kv_blocks, instance_id=spec.instance_id, seed=spec.seed,
                  tied=spec.tied, tp_rank=spec.tp_rank, tp_size=spec.tp_size, save=spec.save,
                  graphs=spec.graphs)


def prefill_figures(result: Any) -> dict[str, Any]:
    figures = {k: v for k, v in asdict(result).items() if k != "logits"}
    return figures


def serve(spec: EngineSpec, stdin: TextIO, stdout: TextIO) -> None:
    import torch

    imported = time.perf_counter()
    engine = build_engine(spec)
    if spec.warmup_tokens:
        from .kv_backend import NoBackend

        backend, engine.backend = engine.backend, NoBackend()
        engine.prefill(list(range(spec.warmup_tokens)))
        engine.backend = backend
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    ready = time.perf_counter()

    def say(message: dict[str, Any]) -> None:
        stdout.write(json.dumps(message) + "\n")
        stdout.flush()

    say({"event": "ready", "pid": os.getpid(), "import_s": imported - STARTED, "build_s": ready - imported})
    for line in stdin:
        message = json.loads(line)
        op = message.get("op")
        try:
            if op == "exit":
                break
            if op == "prefill":
                say(prefill_figures(engine.prefill(message["tokens"])))
            elif op == "run":
                started = time.perf_counter()
                results = [prefill_figures(engine.prefill(p)) for p in message["prompts"]]
                say({"results": results, "wall_s": time.perf_counter() - started})
            else:
                say({"error": f"unknown op {op!r}; expected prefill, run or exit"})
        except Exception as exc:  # report, keep serving: the parent decides
            say({"error": f"{type(exc).__name__}: {exc}"})
    engine.close()


def main(argv: list[str] | None = None) -> None:
    die_with_parent()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m pegaflow_bench_engine.worker SPEC_JSON")
    spec = EngineSpec(**json.loads(args[0]))
    serve(spec, sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
