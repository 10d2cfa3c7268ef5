"""``mla``: a DeepSeek-shaped MLA model with TP ranks as processes sharing one daemon.

MLA's latent cache is the same on every TP rank, so the vLLM connector keys it under shard 0 and
only rank 0 saves it; every rank loads it. Each rank is an engine process holding 1/tp of the
heads and MLP (simulated TP: see model.py). Per prompt, all ranks prefill at once cold (rank 0
saves), then all again warm (each queries shard 0 and loads). Figures: TTFT cold vs warm per rank,
the daemon's block count against prompts x blocks (stored once, not tp times), next-token
agreement. Baseline: the cold TTFT.
"""

from __future__ import annotations

import random
import statistics
import tempfile
from pathlib import Path
from typing import Any

from ..bench import Settings
from ..report import ratio, say, summary, table
from ..worker import EngineProcess, EngineSpec
from ..workload import random_prompt
from .common import KVServer, shape_dict


def run(settings: Settings) -> dict[str, Any]:
    s, T, N, tp = settings.shape, settings.prompt_tokens, settings.prompts, settings.tp
    rng = random.Random(settings.seed)
    prompts = [random_prompt(rng, T, s.vocab) for _ in range(N)]
    full_blocks = T // s.block_size
    pool = settings.pool_size or int(full_blocks * s.block_bytes * (N + 2) * 1.25)
    logs = Path(tempfile.mkdtemp(prefix="pegaflow-bench-mla-"))
    say(f"mla: {s.name} on {settings.device}, TP {tp} as processes, {N} prompts of {T} tokens")
    ranks: list[EngineProcess] = []
    with KVServer(settings, pool) as server:
        try:
            for r in range(tp):
                spec = EngineSpec(shape=shape_dict(settings), graphs=not settings.eager, backend="pegaflow", endpoint=server.endpoint,
                                  device=settings.device, kv_blocks=-(-T // s.block_size) + 4, seed=settings.seed,
                                  tied=bool(settings.tied), instance_id="mla-engine", tp_rank=r, tp_size=tp, save=r == 0,
                                  warmup_tokens=settings.warmup_tokens)
                ranks.append(EngineProcess(spec, logs / f"rank-{r}.log").launch())
            for rank in ranks:
                rank.wait_ready()
            cold, warm = [], []
            for prompt in prompts:
                cold.append(_all_ranks(ranks, prompt))
            stats = server.stats()
            for prompt in prompts:
                warm.append(_all_ranks(ranks, prompt))
        finally:
            for rank in ranks:
                rank.close()
    return _report(settings, cold, warm, stats, full_blocks)


def _all_ranks(ranks: list[EngineProcess], prompt: list[int]) -> list[dict[str, Any]]:
    """One request on every TP rank at once (as vLLM's workers run a step)."""
    for rank in ranks:
        rank.send({"op": "prefill", "tokens": prompt})
    return [rank.receive() for rank in ranks]


def _report(settings: Settings, cold: list[list[dict[str, Any]]], warm: list[list[dict[str, Any]]],
            stats: dict[str, Any], full_blocks: int) -> dict[str, Any]:
    tp, N = settings.tp, settings.prompts
    per_rank = []
    for r in range(tp):
        c = summary([step[r]["ttft_s"] for step in cold])
        w = summary([step[r]["ttft_s"] for step in warm])
        hit = sum(step[r]["hit_tokens"] for step in warm) / sum(step[r]["tokens"] for step in warm)
        saved = sum(step[r]["saved_blocks"] for step in cold)
        per_rank.append({"rank": r, "cold": c, "warm": w, "warm_hit_fraction": hit, "saved_blocks": saved})
    agree = statistics.fmean(c[r]["next_token"] == w[r]["next_token"] for c, w in zip(cold, warm) for r in range(tp))
    expected = N * full_blocks
    figures = {"ranks": per_rank, "daemon_blocks": stats["index_blocks"], "distinct_blocks": expected,
               "stored_once": stats["index_blocks"] == expected, "next_token_agreement": agree,
               "block_bytes": settings.shape.block_bytes}
    cold_mean = statistics.fmean(p["cold"]["mean_ms"] for p in per_rank)
    warm_mean = statistics.fmean(p["warm"]["mean_ms"] for p in per_rank)
    ratios = {"cold / warm TTFT (mean over ranks)": ratio(cold_mean, warm_mean),
              "blocks stored / (blocks x TP ranks)": ratio(stats["index_blocks"], expected * tp)}
    rows = [[p["rank"], p["cold"]["mean_ms"], p["warm"]["mean_ms"], p["warm"]["p99_ms"], f"{100 * p['warm_hit_fraction']:.1f}%",
             p["saved_blocks"]] for p in per_rank]
    say(table(f"MLA ({settings.shape.name}), TP {tp} ranks as processes, {settings.prompt_tokens}-token prompts, {settings.device}",
              ["rank", "cold TTFT ms", "warm TTFT ms", "warm p99 ms", "warm hit", "blocks saved"], rows))
    say(table("daemon and ratios (baseline: cold, same run)", ["figure", "value"],
              [["blocks in the daemon", stats["index_blocks"]], ["distinct prompt blocks", expected],
               ["next token equal cold vs warm", f"{100 * agree:.0f}%"]] + [[k, v] for k, v in ratios.items()]))
    return {"bench": "engine mla", "description": f"MLA latent cache, TP {tp} ranks as processes: stored once, loaded by all",
            "figures": figures, "baseline": {"cold_mean_ms": cold_mean}, "ratios": ratios}
