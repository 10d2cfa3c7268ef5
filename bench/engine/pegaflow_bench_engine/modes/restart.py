"""``restart``: an engine killed with SIGKILL and started again; what its first request costs.

Three scenarios, same prompt, same engine, in one run:

- ``pegaflow``: the daemon keeps running and holds the pool; the restarted engine's first request
  hits everything the dead engine saved;
- ``no pegaflow`` (baseline): the engine alone; its KV died with it, so the first request is
  computed in full;
- ``daemon restarted too``: engine and daemon are both killed; the daemon starts again on its named
  pool (warm restart: the pool file and journal survive), then the engine.

Start-to-ready is from launching the engine process to its "ready" line: interpreter, torch and
device init, weights, KV cache allocation, registration, one warm-up prefill.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ..bench import Settings
from ..report import ratio, say, table
from ..worker import EngineProcess, EngineSpec
from ..workload import random_prompt
from .common import KVServer, kv_server, shape_dict

SEAL_WAIT_S = 2.0  # blocks are sealed (checksum + journal, what survives a daemon crash) just after a save


def run(settings: Settings) -> dict[str, Any]:
    s, T = settings.shape, settings.prompt_tokens
    prompt = random_prompt(random.Random(settings.seed), T, s.vocab)
    pool = settings.pool_size or int(3 * (T // s.block_size) * s.block_bytes)
    logs = Path(tempfile.mkdtemp(prefix="pegaflow-bench-restart-"))
    say(f"restart: {s.name} on {settings.device}, {T}-token prompt, backend {settings.backend}")
    scenarios = {}
    with kv_server(settings, pool) as server:
        scenarios[settings.backend] = _engine_restart(settings, prompt, server.backend_name, server.endpoint, logs / "a")
    scenarios["no pegaflow"] = _engine_restart(settings, prompt, "none", "", logs / "b")
    if settings.backend == "pegaflow":
        scenarios["daemon restarted too"] = _both_restart(settings, prompt, pool, logs / "c")
    return _report(settings, scenarios)


def _spec(settings: Settings, backend: str, endpoint: str) -> EngineSpec:
    return EngineSpec(shape=shape_dict(settings), graphs=not settings.eager, backend=backend, endpoint=endpoint, device=settings.device,
                      kv_blocks=-(-settings.prompt_tokens // settings.shape.block_size) + 4, seed=settings.seed,
                      tied=bool(settings.tied), instance_id="engine-restart", warmup_tokens=settings.warmup_tokens)


def _engine_restart(settings: Settings, prompt: list[int], backend: str, endpoint: str, logs: Path,
                    between: Any = None) -> dict[str, Any]:
    logs.mkdir(parents=True)
    spec = _spec(settings, backend, endpoint)
    first = EngineProcess(spec, logs / "first.log").start()
    try:
        before = first.request({"op": "prefill", "tokens": prompt})
    finally:
        first.kill()
    extra = between() if between else {}
    second = EngineProcess(spec, logs / "second.log").start()
    try:
        after = second.request({"op": "prefill", "tokens": prompt})
    finally:
        second.close()
    return {"first_start_to_ready_s": first.start_to_ready_s, "first_request_ttft_s": before["ttft_s"],
            "restart_to_ready_s": second.start_to_ready_s, "after_restart_ttft_s": after["ttft_s"],
            "after_restart_hit_tokens": after["hit_tokens"], "prompt_tokens": after["tokens"],
            "engine_build_s": second.ready.get("build_s", 0.0)} | extra


def _both_restart(settings: Settings, prompt: list[int], pool: int, logs: Path) -> dict[str, Any]:
    shm_dir = tempfile.mkdtemp(prefix="pegaflow-bench-pool-", dir="/dev/shm")
    server = KVServer(settings, pool, pool_name=f"bench-{uuid.uuid4().hex[:8]}", shm_dir=shm_dir).start()

    def kill_and_restart_daemon() -> dict[str, Any]:
        time.sleep(SEAL_WAIT_S)
        server.kill()
        started = time.perf_counter()
        server.start()
        return {"daemon_restart_to_warm_s": time.perf_counter() - started}

    try:
        return _engine_restart(settings, prompt, "pegaflow", server.endpoint, logs, between=kill_and_restart_daemon)
    finally:
        server.close()
        shutil.rmtree(shm_dir, ignore_errors=True)  # the named pool outlives its daemon by design


def _report(settings: Settings, scenarios: dict[str, dict[str, Any]]) -> dict[str, Any]:
    base = scenarios["no pegaflow"]
    rows = [[name, r["restart_to_ready_s"], 1e3 * r["after_restart_ttft_s"],
             f"{r['after_restart_hit_tokens']}/{r['prompt_tokens']}", 1e3 * r["first_request_ttft_s"]]
            for name, r in scenarios.items()]
    ratios = {f"first-request TTFT after restart, no pegaflow / {name}": ratio(base["after_restart_ttft_s"], r["after_restart_ttft_s"])
              for name, r in scenarios.items() if name != "no pegaflow"}
    ratios |= {f"start-to-ready, {name} / no pegaflow": ratio(r["restart_to_ready_s"], base["restart_to_ready_s"])
               for name, r in scenarios.items() if name != "no pegaflow"}
    say(table(f"engine kill -9 and restart ({settings.shape.name}, {settings.prompt_tokens}-token prompt, {settings.device})",
              ["scenario", "restart to ready s", "first request TTFT ms", "hit tokens", "TTFT before the kill ms"], rows))
    say(table("ratios (baseline: no pegaflow, same run)", ["ratio", "value"], [[k, v] for k, v in ratios.items()]))
    return {"bench": "engine restart", "description": "engine killed with SIGKILL and restarted: start-to-ready and first-request TTFT",
            "figures": scenarios, "baseline": {"no pegaflow": base}, "ratios": ratios}
