"""``share``: K engine processes on one device, one shared daemon vs a private daemon each.

The workload is chat-like: every request is one of S system prompts followed by a user part of its
own, spread over the engines round-robin (every engine sees every system prompt). Both scenarios
get the same total pool: one daemon of P, or K daemons of P/K (each engine with its own cache, as
when every instance keeps its own CPU offload). The default P holds the system prompts 1.5 times
over, so a shared pool keeps them all and a private one thrashes. Figures: hit rate (tokens served
from the cache / prompt tokens), prefill throughput (prompt tokens / wall time of the whole
workload, all engines running at once) and TTFT. Baseline: the private pools.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from pegaflow_core.sizes import format_size

from ..bench import Settings
from ..report import ratio, say, summary, table
from ..worker import EngineProcess, EngineSpec
from ..workload import shared_prefix_requests
from .common import KVServer, shape_dict


def run(settings: Settings) -> dict[str, Any]:
    s, K, B = settings.shape, settings.engines, settings.shape.block_size
    requests = shared_prefix_requests(settings.seed, K * settings.requests, settings.system_prompts,
                                      settings.system_tokens, settings.user_tokens, s.vocab)
    per_engine = [requests[k::K] for k in range(K)]
    system_bytes = settings.system_prompts * (settings.system_tokens // B) * s.block_bytes
    pool = settings.pool_size or int(1.5 * system_bytes)
    say(f"share: {K} engines x {settings.requests} requests ({settings.system_prompts} system prompts of "
        f"{settings.system_tokens} tokens + {settings.user_tokens} user tokens), pool {format_size(pool)} in total")
    logs = Path(tempfile.mkdtemp(prefix="pegaflow-bench-share-"))
    shared = _scenario(settings, per_engine, [KVServer(settings, pool)], logs / "shared")
    private = _scenario(settings, per_engine, [KVServer(settings, pool // K) for _ in range(K)], logs / "private")
    return _report(settings, pool, shared, private)


def _scenario(settings: Settings, per_engine: list[list[list[int]]], servers: list[KVServer], logs: Path) -> dict[str, Any]:
    """Run the workload on every engine at once; servers[k % len(servers)] serves engine k."""
    logs.mkdir(parents=True)
    K = len(per_engine)
    prompt_blocks = max(-(-len(p) // settings.shape.block_size) for p in per_engine[0])
    engines: list[EngineProcess] = []
    try:
        for server in servers:
            server.start()
        for k in range(K):
            spec = EngineSpec(shape=shape_dict(settings), graphs=not settings.eager, backend="pegaflow", endpoint=servers[k % len(servers)].endpoint,
                              device=settings.device, kv_blocks=prompt_blocks + 4, seed=settings.seed,
                              tied=settings.tied if settings.tied is not None else True, instance_id=f"engine-{k}",
                              warmup_tokens=settings.warmup_tokens)
            engines.append(EngineProcess(spec, logs / f"engine-{k}.log").launch())
        for engine in engines:
            engine.wait_ready()
        started = time.perf_counter()
        for engine, prompts in zip(engines, per_engine):
            engine.send({"op": "run", "prompts": prompts})
        replies = [engine.receive() for engine in engines]
        wall = time.perf_counter() - started
    finally:
        for engine in engines:
            engine.close()
        for server in servers:
            server.close()
    results = [r for reply in replies for r in reply["results"]]
    tokens = sum(r["tokens"] for r in results)
    hit = sum(r["hit_tokens"] for r in results)
    return {"requests": len(results), "prompt_tokens": tokens, "hit_tokens": hit, "hit_rate": hit / tokens,
            "wall_s": wall, "prefill_tokens_per_s": tokens / wall, "computed_tokens_per_s": (tokens - hit) / wall,
            "ttft": summary([r["ttft_s"] for r in results]), "servers": len(servers)}


def _report(settings: Settings, pool: int, shared: dict[str, Any], private: dict[str, Any]) -> dict[str, Any]:
    K = settings.engines
    rows = [[name, f"{100 * r['hit_rate']:.1f}%", r["prefill_tokens_per_s"], r["wall_s"], r["ttft"]["mean_ms"], r["ttft"]["p99_ms"]]
            for name, r in ((f"one shared daemon ({format_size(pool)})", shared),
                            (f"{K} private daemons ({format_size(pool // K)} each)", private))]
    ratios = {"prefill tokens/s, shared / private": ratio(shared["prefill_tokens_per_s"], private["prefill_tokens_per_s"]),
              "hit rate, shared - private (points)": 100 * (shared["hit_rate"] - private["hit_rate"]),
              "mean TTFT, private / shared": ratio(private["ttft"]["mean_ms"], shared["ttft"]["mean_ms"])}
    say(table(f"{K} engines on {settings.device}, {settings.shape.name}{' (tied weights)' if settings.tied is not False else ''}",
              ["pool", "hit rate", "prefill tok/s", "wall s", "TTFT mean ms", "TTFT p99 ms"], rows))
    say(table("ratios (baseline: private pools, same run)", ["ratio", "value"], [[k, v] for k, v in ratios.items()]))
    return {"bench": "engine share", "description": f"{K} engine processes, one shared daemon vs {K} private daemons of 1/{K} the pool",
            "figures": {"shared": shared, "private": private, "pool_bytes": pool}, "baseline": {"private": private},
            "ratios": ratios}
