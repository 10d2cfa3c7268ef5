"""vLLM's base types of the connector's step metadata and stats.

The worker half (worker_side, metadata, stats) only subclasses these; it never calls into vLLM.
Where vLLM is not installed (the GPU test machine: vLLM's wheel cannot be carried there), the
same names are plain classes with vLLM's fields, so the worker half runs and is tested on its own.
Under vLLM the connector's classes are vLLM's subclasses, as its KV transfer code checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
except ImportError:
    class KVConnectorMetadata:  # type: ignore[no-redef]
        """vLLM absent: scheduler -> worker step metadata has no behaviour of its own."""

    class KVConnectorWorkerMetadata:  # type: ignore[no-redef]
        """vLLM absent: worker -> scheduler metadata; subclasses define aggregate()."""

    @dataclass
    class KVConnectorStats:  # type: ignore[no-redef]
        """vLLM absent: the counters' container, as vLLM defines it."""

        data: dict[str, Any] = field(default_factory=dict)

        def to_dict(self) -> dict[str, Any]:
            return self.data


__all__ = ["KVConnectorMetadata", "KVConnectorStats", "KVConnectorWorkerMetadata"]
