"""What the scheduler-side connector tells the workers each step, and what they answer.

Both cross a process boundary (vLLM pickles them), so they are plain dataclasses of lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .vllm_types import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class LoadSpec:
    """Load the first ``len(block_ids)`` blocks of a lease into these engine blocks.

    The lease was taken by the scheduler in (``namespace``, ``shard``). A worker whose context
    is that key space loads it directly; any other rank (another TP shard, another pipeline
    stage) queries its own shard with ``block_hashes`` first and loads what that lease holds.
    """

    req_id: str
    lease_id: str
    namespace: str
    shard: int
    block_ids: list[int]
    block_hashes: list[bytes]


@dataclass
class PegaflowMetadata(KVConnectorMetadata):
    """One engine step: loads to run before the forward, one batched save after it, finished
    requests whose blocks vLLM keeps until every worker reports their saves done, and whether
    requests were preempted (their blocks may be reused this step: saves must drain first)."""

    loads: list[LoadSpec] = field(default_factory=list)
    save_block_ids: list[int] = field(default_factory=list)
    save_hashes: list[bytes] = field(default_factory=list)
    save_req_ids: list[str] = field(default_factory=list)
    held_req_ids: list[str] = field(default_factory=list)
    preempted_req_ids: list[str] = field(default_factory=list)


@dataclass
class PegaflowWorkerMeta(KVConnectorWorkerMetadata):
    """Leases a worker finished loading this step. vLLM merges every worker's answer before the
    scheduler sees it, so a lease in the merged set is no longer needed by any rank."""

    loaded_leases: set[str] = field(default_factory=set)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, PegaflowWorkerMeta):
            return PegaflowWorkerMeta(self.loaded_leases | other.loaded_leases)
        return self
