"""``PegaflowConnector``: vLLM's KV connector API (KVConnectorBase_V1, vLLM 0.32-0.33) mapped
onto the scheduler half (scheduler_side.py) and the worker half (worker_side.py).

vLLM builds one instance per process and role: one in the scheduler (engine core), one in every
worker. The methods of the other role are never called on an instance; if they are, that is a
vLLM bug we want to see, so they raise instead of doing nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from .kv_layout import CacheLayout
from .metadata import PegaflowMetadata
from .options import ConnectorOptions
from .scheduler_side import PegaflowScheduler
from .stats import PegaflowStats, build_stats
from .worker_side import PegaflowWorker, Ranks

if TYPE_CHECKING:
    import torch

    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger("pegaflow.vllm")


class PegaflowConnector(KVConnectorBase_V1):
    """KV cache shared through a pegaflow daemon; see docs/vllm.md."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        self.options = ConnectorOptions.from_extra_config(transfer.kv_connector_extra_config)
        self.layout = CacheLayout.from_config(vllm_config, kv_cache_config)
        model = self.options.model or _model_name(vllm_config)
        instance_id = self.options.instance_id or str(transfer.engine_id or "vllm")
        self._scheduler: PegaflowScheduler | None = None
        self._worker: PegaflowWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            if transfer.kv_load_failure_policy != "recompute":
                # vLLM reads the policy right after building this connector. A cache that cannot
                # deliver a block must cost a recompute, never a failed request.
                log.warning("pegaflow: kv_load_failure_policy=%r -> 'recompute' (a block the cache cannot "
                            "deliver is computed again)", transfer.kv_load_failure_policy)
                transfer.kv_load_failure_policy = "recompute"
            self._scheduler = PegaflowScheduler(vllm_config, kv_cache_config, self.options, self.layout, model, instance_id)
        else:
            self._worker = PegaflowWorker(vllm_config, self.options, self.layout, model, instance_id, _ranks(vllm_config))

    @property
    def scheduler(self) -> PegaflowScheduler:
        if self._scheduler is None:
            raise RuntimeError("PegaflowConnector: a scheduler method was called on a worker-side connector")
        return self._scheduler

    @property
    def worker(self) -> PegaflowWorker:
        if self._worker is None:
            raise RuntimeError("PegaflowConnector: a worker method was called on the scheduler-side connector")
        return self._worker

    @property
    def requires_kv_delivery(self) -> bool:
        """A best-effort cache: a save lost to preemption is a future miss, nothing more."""
        return False

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Attention layers wait for their layer's load (wait_for_layer_load): full CUDA graphs
        would skip those waits on replay and read KV before it arrives."""
        return True

    # -- worker side --------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches, self._kv_cache_config.num_blocks)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if isinstance(kv_connector_metadata, PegaflowMetadata) and kv_connector_metadata.preempted_req_ids:
            self.worker.drain_saves()  # preempted blocks are reused this step: nothing may read them after

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self.worker.start_load(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Nothing per layer: the daemon copies all layers of the step's blocks in the one Save
        RPC that wait_for_save sends (one RPC per step, never per layer or block)."""

    def wait_for_save(self) -> None:
        self.worker.submit_save(self._meta())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        meta = self._connector_metadata if isinstance(self._connector_metadata, PegaflowMetadata) else None
        done = self.worker.get_finished(meta)
        return (done or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self.worker.take_worker_meta()

    def get_kv_connector_stats(self) -> PegaflowStats | None:
        side = self._worker or self._scheduler
        return side.take_stats() if side is not None else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()

    def _meta(self) -> PegaflowMetadata:
        meta = self._get_connector_metadata()
        if not isinstance(meta, PegaflowMetadata):
            raise TypeError(f"PegaflowConnector got {type(meta).__name__} metadata; is another connector configured?")
        return meta

    # -- scheduler side -----------------------------------------------------------------------------
    def on_new_request(self, request: Any) -> None:
        self.scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output, self._kv_cache_manager)

    def update_connector_output(self, connector_output: Any) -> None:
        self.scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> PegaflowStats | None:
        return build_stats(data)


def _model_name(vllm_config: Any) -> str:
    served = vllm_config.model_config.served_model_name
    if isinstance(served, (list, tuple)):
        served = served[0] if served else None
    return str(served or vllm_config.model_config.model)


def _ranks(vllm_config: Any) -> Ranks:
    """This worker's TP/PP position; 0 where vLLM's process groups are not set up (tools, tests)."""
    parallel = vllm_config.parallel_config
    tp_rank = pp_rank = 0
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        tp_rank = get_tp_group().rank_in_group
        pp_rank = get_pp_group().rank_in_group
    except (AssertionError, AttributeError, RuntimeError):
        pass
    return Ranks(tp_rank, parallel.tensor_parallel_size, pp_rank, parallel.pipeline_parallel_size)
