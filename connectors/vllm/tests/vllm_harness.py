"""Test harness of the connector tests: a small engine made of vLLM's real
Scheduler, real KV tensors (allocated by vLLM's own allocate_kv_cache) and the real connector on
both sides, with a fake forward pass that writes deterministic KV bytes per token.

vLLM is only imported inside fixtures, so a venv without vLLM skips the tests (with a reason)
instead of failing to collect them.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

BLOCK = 16
LAYERS = 2
KV_HEADS = 2
HEAD = 32
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": KV_HEADS, "num_hidden_layers": LAYERS, "vocab_size": 1000,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "torch_dtype": "float16", "head_dim": HEAD,
}
DAEMON_CONFIG = "index: {kind: local}\ntiers: [{kind: dram, capacity: 32mb, chunk: 1mb}]\n"


def need_vllm() -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed here: run connectors/vllm/setup-test-env.sh")


def vllm_config(model_dir: Path, endpoint: str, role: str = "kv_both", layout: str = "LBNHC", tp: int = 1,
                extra: dict[str, Any] | None = None, max_model_len: int = 1024) -> Any:
    from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, ParallelConfig, SchedulerConfig, VllmConfig

    model = ModelConfig(model=str(model_dir), skip_tokenizer_init=True, dtype="float16", max_model_len=max_model_len)
    cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=True)
    cache.kv_cache_layout = layout  # the engine core resolves it before connectors exist; mirror that
    transfer = KVTransferConfig(
        kv_connector="PegaflowConnector", kv_connector_module_path="pegaflow_vllm", kv_role=role,
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={"pegaflow.endpoint": endpoint, "pegaflow.timeout_s": 2, "pegaflow.retry_interval_s": 0.2,
                                   **(extra or {})},
    )
    return VllmConfig(
        model_config=model, cache_config=cache, kv_transfer_config=transfer, device_config=DeviceConfig("cpu"),
        scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=max_model_len,
                                         is_encoder_decoder=False),
        parallel_config=ParallelConfig(tensor_parallel_size=tp),
    )


def kv_cache_config(num_blocks: int, layout: str = "LBNHC", spec: Any = None) -> Any:
    """A KVCacheConfig as vLLM's planner writes it: one backing allocation, one tensor entry for
    all layers with the layer/block strides of ``layout``."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor

    spec = spec or FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD, dtype=torch.float16)
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    page = spec.page_size_bytes
    if layout.startswith("B"):  # block-outermost ("cross-layer"): a block holds every layer's page
        layer_stride, block_stride = page, page * LAYERS
    else:
        layer_stride, block_stride = page * num_blocks, page
    return KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[KVCacheTensor(size=page * num_blocks * LAYERS, layers=layers, layer_stride=layer_stride, block_stride=block_stride)],
        kv_cache_groups=[KVCacheGroupSpec(layers, spec)],
        kv_cache_layout=layout,
    )


def token_kv(tokens: list[int], position: int, layer: int, nbytes: int) -> bytes:
    """KV bytes of one token of one layer: a function of the whole prefix, like real KV."""
    seed = hashlib.sha256(repr((layer, tokens[: position + 1])).encode()).digest()
    return (seed * (nbytes // len(seed) + 1))[:nbytes]


@dataclass
class StepResult:
    output: Any
    meta: Any
    loaded: dict[str, list[int]] = field(default_factory=dict)  # req_id -> engine blocks loaded
    invalid: set[int] = field(default_factory=set)


class Engine:
    """vLLM's Scheduler driving the connector on both sides, one worker (TP 1) in this process."""

    def __init__(self, model_dir: Path, endpoint: str, num_blocks: int = 64, role: str = "kv_both",
                 layout: str = "LBNHC", extra: dict[str, Any] | None = None, kv_caches: dict[str, Any] | None = None) -> None:
        import torch
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_layout import KVCacheLayout
        from vllm.v1.structured_output import StructuredOutputManager
        from vllm.v1.worker.utils import allocate_kv_cache

        from pegaflow_vllm import PegaflowConnector

        self.config = vllm_config(model_dir, endpoint, role=role, layout=layout, extra=extra)
        self.kv_config = kv_cache_config(num_blocks, layout)
        self.config.cache_config.num_gpu_blocks = num_blocks
        self.scheduler = Scheduler(vllm_config=self.config, kv_cache_config=self.kv_config, log_stats=True,
                                   structured_output_manager=StructuredOutputManager(self.config), block_size=BLOCK)
        self.kv = kv_caches or allocate_kv_cache(self.kv_config, torch.device("cpu"), KVCacheLayout[layout])
        self.worker = PegaflowConnector(self.config, KVConnectorRole.WORKER, self.kv_config)
        self.worker.register_kv_caches(self.kv)
        self.requests: dict[str, Any] = {}
        self.finished: set[str] = set()
        self.stats: Counter[str] = Counter()  # the connector stats vLLM reported, summed

    @property
    def connector(self) -> Any:
        return self.scheduler.connector

    def add(self, req_id: str, tokens: list[int], max_tokens: int = 2) -> Any:
        from vllm import SamplingParams
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.request import Request

        init_none_hash(sha256)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        params.update_from_generation_config({}, 999)
        request = Request(request_id=req_id, prompt_token_ids=list(tokens), sampling_params=params, pooling_params=None,
                          mm_features=None, block_hasher=get_request_block_hasher(BLOCK, sha256))
        self.requests[req_id] = request
        self.scheduler.add_request(request)
        return request

    def step(self, before_worker: Any = None) -> StepResult:
        """One engine step; ``before_worker()`` runs between scheduling and the worker (faults)."""
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        out = self.scheduler.schedule()
        meta = out.kv_connector_metadata
        if before_worker is not None:
            before_worker()
        w = self.worker
        w.handle_preemptions(meta)
        w.bind_connector_metadata(meta)
        if out.has_sync_kv_loads:
            w.start_load_kv(None)
        for name in sorted(self.kv):
            w.wait_for_layer_load(name)
            self._forward_layer(name, out)
            w.save_kv_layer(name, self.kv[name], None)
        if not out.has_sync_kv_loads:
            w.start_load_kv(None)
        w.wait_for_save()
        sending, _ = w.get_finished(out.finished_req_ids)
        invalid = w.get_block_ids_with_load_errors()
        worker_meta = w.build_connector_worker_meta()
        worker_stats = w.get_kv_connector_stats()
        w.clear_connector_metadata()
        req_ids = list(out.num_scheduled_tokens)
        runner_output = ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[[7] for _ in req_ids], logprobs=None, prompt_logprobs_dict={}, pooler_output=None,
            kv_connector_output=KVConnectorOutput(finished_sending=sending, invalid_block_ids=invalid,
                                                  kv_connector_worker_meta=worker_meta, kv_connector_stats=worker_stats),
        )
        outputs = self.scheduler.update_from_output(out, runner_output)
        for engine_outputs in outputs.values():
            stats = engine_outputs.scheduler_stats
            if stats is not None and stats.kv_connector_stats:
                self.stats.update(stats.kv_connector_stats)
            for o in engine_outputs.outputs:
                if o.finish_reason is not None:
                    self.finished.add(o.request_id)
        loaded = {spec.req_id: spec.block_ids for spec in meta.loads}
        return StepResult(out, meta, loaded, invalid)

    def _forward_layer(self, name: str, out: Any) -> None:
        """Write the KV of every token this step computes (the fake attention layer)."""
        import torch

        layer = sorted(self.kv).index(name)
        view = self.kv[name]
        for req_id, count in out.num_scheduled_tokens.items():
            request = self.requests[req_id]
            start = request.num_computed_tokens - count  # schedule() already advanced it
            table = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
            tokens = list(request.all_token_ids)
            for pos in range(start, min(start + count, len(tokens))):
                cell = view[table[pos // BLOCK], :, pos % BLOCK, :]
                data = token_kv(tokens, pos, layer, cell.numel() * cell.element_size())
                cell.copy_(torch.frombuffer(bytearray(data), dtype=cell.dtype).view(cell.shape))

    def block_matches(self, req_id: str, position_block: int, block_id: int) -> bool:
        """Whether engine block ``block_id`` holds the KV of block ``position_block`` of the request."""
        import torch

        tokens = list(self.requests[req_id].all_token_ids)
        for layer, name in enumerate(sorted(self.kv)):
            for slot in range(BLOCK):
                pos = position_block * BLOCK + slot
                cell = self.kv[name][block_id, :, slot, :]
                expected = token_kv(tokens, pos, layer, cell.numel() * cell.element_size())
                if bytes(cell.contiguous().view(torch.uint8).numpy().tobytes()) != expected:
                    return False
        return True

    def run(self, max_steps: int = 400, timeout_s: float = 30.0) -> list[StepResult]:
        """Step until no request is left. Steps that schedule nothing (vLLM waiting for saves
        to report) sleep a little, as an idle engine loop would."""
        import time

        deadline = time.monotonic() + timeout_s
        results = []
        while self.scheduler.has_requests():
            if len(results) >= max_steps or time.monotonic() > deadline:
                raise AssertionError(f"requests still unfinished after {len(results)} steps: {list(self.scheduler.requests)}")
            results.append(self.step())
            if not results[-1].output.num_scheduled_tokens:
                time.sleep(0.01)
        return results

    def close(self) -> None:
        self.worker.shutdown()
        if self.connector is not None:
            self.connector.shutdown()


