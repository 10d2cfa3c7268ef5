"""``ttft``: time to first token of long prompts, cold vs warm from DRAM vs warm from SSD.

One engine in this process, its weights generated once. Phases, all in one run:

1. no KV backend: N prompts computed from scratch (the engine alone; baseline of the overhead);
2. DRAM daemon: N new prompts cold (miss, compute, save), then the same N warm (hit all but the
   last block, load layer by layer, compute one block), each twice where the engine can copy
   loads itself (engine_copy.py): so, and by the daemon, alternating; then the sweep: prompts
   that share a growing prefix with a cached one;
3. SSD daemon (a DRAM tier of 1.5 prompts over an SSD tier): N+2 prompts saved, so the first N
   were evicted to the SSD, then those N again: the Query answers ``loading`` while the daemon
   promotes them, the engine asks again, then loads.

The baseline of every ratio is the cold TTFT of phase 2.
"""

from __future__ import annotations

import random
import time
from typing import Any

from ..bench import Settings
from ..engine import Engine, Prefill
from ..kv_backend import NoBackend
from ..report import ratio, say, summary, table, write_sweep
from ..workload import random_prompt
from .common import device, kv_server, ssd_directory

SWEEP = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def run(settings: Settings) -> dict[str, Any]:
    shape, T, N = settings.shape, settings.prompt_tokens, settings.prompts
    rng = random.Random(settings.seed)
    fresh = lambda: random_prompt(rng, T, shape.vocab)  # noqa: E731
    prompt_bytes = (T // shape.block_size) * shape.block_bytes
    dram = settings.pool_size or int(prompt_bytes * (N + len(SWEEP) + 2) * 1.25)
    engine = Engine(shape, NoBackend(), device(settings), kv_blocks=-(-T // shape.block_size) + 8, seed=settings.seed,
                    tied=bool(settings.tied), graphs=not settings.eager)
    try:
        say(f"ttft: {shape.name} on {settings.device}, {T}-token prompts, {N} per phase, backend {settings.backend}")
        started = time.monotonic()
        progress = lambda what: say(f"  {time.monotonic() - started:6.1f} s  {what}")  # noqa: E731
        for _ in range(2):
            engine.prefill(fresh())  # kernels, allocator
        progress("warmed up")
        no_cache = [engine.prefill(fresh()) for _ in range(N)]
        progress(f"no KV backend: {N} prompts")
        with kv_server(settings, dram) as server:
            progress(f"DRAM daemon serving, pool {dram / 1e9:.1f} GB")
            backend = server.backend()
            engine.use_backend(backend)
            copy_here = getattr(backend, "engine_copy_ready", lambda: False)()
            progress(f"loads copied by {'the engine itself (daemon for comparison)' if copy_here else 'the daemon'}")
            warm_up = fresh()
            engine.prefill(warm_up), engine.prefill(warm_up)  # the load path once, uncounted
            prompts = [fresh() for _ in range(N)]
            cold = [engine.prefill(p) for p in prompts]
            progress(f"cold: {N} prompts")
            warm, by_daemon = [], []
            for i, p in enumerate(prompts):  # engine-side and daemon copies alternate, same prompts
                for here in ((True, False) if i % 2 == 0 else (False, True)) if copy_here else (True,):
                    backend.engine_copy = here
                    (warm if here else by_daemon).append(engine.prefill(p))
            backend.engine_copy = True
            progress(f"warm: {N} prompts")
            base = prompts[0]
            sweep = []
            for fraction in SWEEP:
                shared = int(fraction * T)
                result = engine.prefill(base[:shared] + random_prompt(rng, T - shared, shape.vocab))
                sweep.append({"fraction": fraction, "cached_tokens": result.hit_tokens, "prompt_tokens": T,
                              "ttft_ms": 1e3 * result.ttft_s})
        progress("sweep")
        ssd = _warm_ssd(settings, engine, fresh, prompt_bytes)
        progress("warm from SSD")
    finally:
        engine.close()
    plot = write_sweep(sweep, settings.out_dir, f"{shape.name}, {T}-token prompts, {settings.device} ({settings.backend})")
    return _report(settings, no_cache, cold, warm, by_daemon, ssd, sweep, plot)


def _warm_ssd(settings: Settings, engine: Engine, fresh: Any, prompt_bytes: int) -> list[Prefill]:
    N = settings.prompts
    with ssd_directory(settings) as ssd_dir, \
            kv_server(settings, int(1.5 * prompt_bytes), ssd_dir, int(prompt_bytes * (N + 3) * 1.5)) as server:
        engine.use_backend(server.backend())
        prompts = [fresh() for _ in range(N + 2)]
        for p in prompts:
            engine.prefill(p)
        results = [engine.prefill(p) for p in prompts[:N]]
        engine.use_backend(NoBackend())
    return results


def _report(settings: Settings, no_cache: list[Prefill], cold: list[Prefill], warm: list[Prefill],
            by_daemon: list[Prefill], ssd: list[Prefill], sweep: list[dict[str, Any]], plot: str) -> dict[str, Any]:
    T = settings.prompt_tokens
    rows, figures = [], {}
    phases = [("no KV backend", no_cache), ("cold (miss, compute, save)", cold), ("warm, DRAM", warm),
              ("warm, DRAM, daemon copies", by_daemon), ("warm, SSD", ssd)]
    for name, runs in [(name, runs) for name, runs in phases if runs]:
        s = summary([r.ttft_s for r in runs])
        hit = sum(r.hit_tokens for r in runs) / max(1, sum(r.tokens for r in runs))
        key = name.split(" (")[0].replace(", ", "_").replace(" ", "_").lower()
        figures[key] = s | {"hit_fraction": hit, "save_ms_mean": 1e3 * sum(r.save_s for r in runs) / len(runs),
                            "promote_wait_ms_mean": 1e3 * sum(r.promote_wait_s for r in runs) / len(runs),
                            "hash_ms_mean": 1e3 * sum(r.hash_s for r in runs) / len(runs),
                            "query_ms_mean": 1e3 * sum(r.query_s - r.hash_s for r in runs) / len(runs),
                            "load_wait_ms_mean": 1e3 * sum(r.load_wait_s for r in runs) / len(runs),
                            "load_call_ms_mean": 1e3 * sum(r.load_issue_s for r in runs) / len(runs),
                            "loaded_at_ms_mean": 1e3 * sum(r.load_end_s for r in runs) / len(runs),
                            "failed_blocks": sum(r.failed_blocks for r in runs)}
        f = figures[key]
        rows.append([name, s["n"], s["mean_ms"], s["p99_ms"], f"{100 * hit:.1f}%", f["hash_ms_mean"], f["query_ms_mean"],
                     f["load_call_ms_mean"], f["load_wait_ms_mean"], f["loaded_at_ms_mean"], f["save_ms_mean"]])
    cold_s, warm_s, ssd_s = figures["cold"], figures["warm_dram"], figures["warm_ssd"]
    ratios = {
        "cold / warm_dram (mean)": ratio(cold_s["mean_ms"], warm_s["mean_ms"]),
        "cold / warm_dram (p99)": ratio(cold_s["p99_ms"], warm_s["p99_ms"]),
        "cold / warm_ssd (mean)": ratio(cold_s["mean_ms"], ssd_s["mean_ms"]),
        **({"cold / warm_dram, daemon copies (mean)": ratio(cold_s["mean_ms"], figures["warm_dram_daemon_copies"]["mean_ms"])}
           if by_daemon else {}),
        "cold / no KV backend (mean): miss overhead": ratio(cold_s["mean_ms"], figures["no_kv_backend"]["mean_ms"]),
    }
    say(table(f"TTFT, {T}-token prompts ({settings.shape.name}, {settings.device}, backend {settings.backend})",
              ["phase", "n", "mean ms", "p99 ms", "hit", "hash ms", "query ms", "Load call ms", "waiting for loads ms", "all loaded at ms",
               "save ms"], rows))
    say(table("TTFT vs cached prefix", ["cached tokens", "TTFT ms"], [[p["cached_tokens"], p["ttft_ms"]] for p in sweep]))
    say(table("ratios (baseline: cold, same run)", ["ratio", "value"], [[k, v] for k, v in ratios.items()]))
    say(f"plot: {plot}")
    return {"bench": "engine ttft", "description": f"TTFT of {T}-token prompts: cold vs warm (DRAM, SSD); sweep of the cached prefix",
            "figures": figures | {"sweep": sweep, "plot": plot}, "baseline": {"cold_mean_ms": cold_s["mean_ms"]},
            "ratios": ratios}
