"""The reference engine against a real daemon, on CPU with tiny shapes: a prefix loaded from pegaflow
gives the logits a full recompute gives, across processes and across a SIGKILL."""

from __future__ import annotations

import dataclasses
import random

import pytest

torch = pytest.importorskip("torch")

from pegaflow_core.launcher import DaemonProcess  # noqa: E402

from pegaflow_bench_engine.engine import Engine  # noqa: E402
from pegaflow_bench_engine.kv_backend import NoBackend, PegaflowBackend  # noqa: E402
from pegaflow_bench_engine.kv_cache import PagedKVCache  # noqa: E402
from pegaflow_bench_engine.shapes import DEEPSEEK_MLA, LLAMA_3_1_8B, tiny  # noqa: E402
from pegaflow_bench_engine.worker import EngineProcess, EngineSpec  # noqa: E402

CPU = torch.device("cpu")
SHAPES = {"gqa": tiny(LLAMA_3_1_8B), "mla": tiny(DEEPSEEK_MLA)}
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1}


@pytest.fixture(scope="module")
def daemon():
    with DaemonProcess("tiers: [{kind: dram, capacity: 16mb, chunk: 64kb}]\n") as d:
        yield d


def prompt(n: int, seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


class ZeroingLoad:
    """A load whose blocks are wiped once in place: what a wrong prefix does to the logits."""

    def __init__(self, inner, cache, block_ids) -> None:
        self.inner, self.cache, self.block_ids = inner, cache, torch.tensor(block_ids)

    def wait_layer(self, layer: int) -> None:
        self.inner.wait_layer(layer)
        view = self.cache.layers[layer]
        if view.dim() == 5:
            view[:, self.block_ids] = 0
        else:
            view[self.block_ids] = 0

    def finish(self):
        return self.inner.finish()


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_gather_returns_the_requests_tokens_block_by_block_in_table_order(kind):
    shape = SHAPES[kind]
    cache = PagedKVCache(shape, 12, CPU)
    try:
        cache.flat.view(torch.float32 if shape.dtype == "float32" else torch.bfloat16).normal_()
        table = torch.tensor([7, 2, 11, 0])
        tokens = 3 * shape.block_size + 5  # a partial last block
        for layer in range(shape.layers):
            got = cache.gather(layer, table, tokens)
            view = cache.layers[layer]
            for i, block in enumerate(table.tolist()):
                rows = slice(i * shape.block_size, min(tokens, (i + 1) * shape.block_size))
                n = rows.stop - rows.start
                if kind == "gqa":
                    assert torch.equal(got[0][rows], view[0, block, :n]) and torch.equal(got[1][rows], view[1, block, :n])
                else:
                    assert torch.equal(got[rows], view[block, :n])
    finally:
        cache.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["gqa", "mla"])
@pytest.mark.parametrize("tokens", [100, 96])  # a partial last block, and an exact multiple of the block size
def test_loaded_prefix_gives_the_logits_of_a_full_recompute(daemon, kind, dtype, tokens):
    shape = dataclasses.replace(SHAPES[kind], dtype=dtype)
    tokens_ = prompt(tokens, tokens, shape.vocab)
    reference = Engine(shape, NoBackend(), CPU, kv_blocks=16)
    engine = Engine(shape, PegaflowBackend(daemon.endpoint), CPU, kv_blocks=16, seed=0)
    try:
        full = reference.prefill(tokens_, keep_logits=True)
        cold = engine.prefill(tokens_, keep_logits=True)
        warm = engine.prefill(tokens_, keep_logits=True)
    finally:
        engine.close()
        reference.close()
    B = shape.block_size
    assert cold.hit_tokens == 0 and cold.saved_blocks == tokens // B
    assert warm.hit_tokens == (tokens - 1) // B * B
    assert warm.computed_tokens == tokens - warm.hit_tokens
    assert warm.logits.shape == (warm.computed_tokens, shape.vocab)
    expected = full.logits[-warm.computed_tokens:].float()
    scale = expected.abs().max().item()
    assert (warm.logits.float() - expected).abs().max().item() <= TOLERANCE[dtype] * max(1.0, scale)
    assert warm.next_token == full.next_token


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_a_wrong_prefix_changes_the_logits(daemon, kind):
    """The comparison above can fail: wiping the loaded blocks moves the logits far past it."""
    shape = SHAPES[kind]
    tokens = prompt(100, 2, shape.vocab)
    reference = Engine(shape, NoBackend(), CPU, kv_blocks=16)
    backend = PegaflowBackend(daemon.endpoint)
    engine = Engine(shape, backend, CPU, kv_blocks=16)
    inner_load = backend.load
    backend.load = lambda hit, ids: ZeroingLoad(inner_load(hit, ids), engine.cache, ids)
    try:
        full = reference.prefill(tokens, keep_logits=True)
        engine.prefill(tokens)
        warm = engine.prefill(tokens, keep_logits=True)
    finally:
        engine.close()
        reference.close()
    assert warm.hit_tokens > 0
    assert (warm.logits - full.logits[-warm.computed_tokens:]).abs().max().item() > 100 * TOLERANCE["float32"]


def spec(endpoint: str, **overrides) -> EngineSpec:
    shape = dataclasses.asdict(SHAPES["gqa"])
    return EngineSpec(**({"shape": shape, "backend": "pegaflow", "endpoint": endpoint, "kv_blocks": 16} | overrides))


def test_a_second_engine_process_hits_what_the_first_saved(daemon, tmp_path):
    tokens = prompt(90, 3, SHAPES["gqa"].vocab)
    local = Engine(SHAPES["gqa"], PegaflowBackend(daemon.endpoint), CPU, kv_blocks=16)
    try:
        first = local.prefill(tokens)
    finally:
        local.close()
    other = EngineProcess(spec(daemon.endpoint, instance_id="other"), tmp_path / "other.log").start()
    try:
        reply = other.request({"op": "prefill", "tokens": tokens})
    finally:
        other.close()
    assert first.saved_blocks == 90 // 16
    assert reply["hit_tokens"] == 80 and reply["computed_tokens"] == 10
    assert reply["next_token"] == first.next_token


def test_an_engine_killed_with_sigkill_hits_on_its_first_request_after_restart(daemon, tmp_path):
    tokens = prompt(120, 4, SHAPES["gqa"].vocab)
    s = spec(daemon.endpoint, instance_id="victim", seed=0)
    victim = EngineProcess(s, tmp_path / "victim.log").start()
    try:
        before = victim.request({"op": "prefill", "tokens": tokens})
    finally:
        victim.kill()
    assert victim.proc.returncode == -9
    restarted = EngineProcess(s, tmp_path / "restarted.log").start()
    try:
        after = restarted.request({"op": "prefill", "tokens": tokens})
    finally:
        restarted.close()
    assert before["hit_tokens"] == 0 and before["saved_blocks"] == 120 // 16
    assert after["hit_tokens"] == 112
    assert after["next_token"] == before["next_token"]


def test_engine_refuses_bad_shapes_and_full_caches(daemon):
    with pytest.raises(ValueError, match="q_heads .* must be a multiple of kv_heads"):
        SHAPES["gqa"].scaled(q_heads=5)
    engine = Engine(SHAPES["gqa"], NoBackend(), CPU, kv_blocks=2)
    try:
        with pytest.raises(ValueError, match="needs 7 KV blocks, 2 of 2 are free; raise --kv-blocks"):
            engine.prefill(prompt(100, 5, SHAPES["gqa"].vocab))
    finally:
        engine.close()
