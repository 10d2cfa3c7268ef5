"""CUDA graphs for short suffixes (graphs.py) on a real GPU against a real daemon (skipped without
one): a warm request replaying captured layer graphs gives the logits the eager engine gives, and
reads the KV loaded for it, not what the capture saw."""

from __future__ import annotations

import dataclasses
import random

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

from pegaflow_core.launcher import DaemonProcess  # noqa: E402

from pegaflow_bench_engine.engine import Engine  # noqa: E402
from pegaflow_bench_engine.kv_backend import NoBackend, PegaflowBackend  # noqa: E402
from pegaflow_bench_engine.shapes import DEEPSEEK_MLA, LLAMA_3_1_8B, tiny  # noqa: E402
from pegaflow_bench_engine.workload import random_prompt  # noqa: E402

GPU = torch.device("cuda")
SHAPES = {"gqa": tiny(LLAMA_3_1_8B), "mla": tiny(DEEPSEEK_MLA)}


@pytest.fixture(scope="module")
def daemon():
    with DaemonProcess("tiers: [{kind: dram, capacity: 64mb, chunk: 1mb}]\n") as d:
        yield d


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_replayed_graphs_give_the_eager_logits_of_each_prompt(daemon, kind):
    shape = dataclasses.replace(SHAPES[kind], dtype="float32")
    first, second = (random_prompt(random.Random(seed), 100, shape.vocab) for seed in (1, 2))
    reference = Engine(shape, NoBackend(), GPU, kv_blocks=16, graphs=False)
    engine = Engine(shape, PegaflowBackend(daemon.endpoint), GPU, kv_blocks=16, instance_id=f"graphs-{kind}")
    try:
        expected = [reference.prefill(p, keep_logits=True).logits for p in (first, second)]
        engine.prefill(first), engine.prefill(second)  # cold: saved
        eager = engine.prefill(first, keep_logits=True)  # warm, 4 new tokens: eager, then captured
        assert engine.graphs is not None and engine.graphs.runner((4, 100, 7)) is not None
        replayed = [engine.prefill(p, keep_logits=True) for p in (second, first)]
    finally:
        engine.close()
        reference.close()
    assert [r.hit_tokens for r in replayed] == [96, 96]
    assert torch.equal(replayed[1].logits, eager.logits)  # same request, same kernels: same bits
    for got, want in zip(replayed, (expected[1], expected[0])):
        assert (got.logits - want[-4:]).abs().max().item() <= 1e-3 * max(1.0, want.abs().max().item())
