"""Connector statistics through vLLM's KV connector stats hooks: workers and the scheduler
count, vLLM sums every rank's numbers per logging interval and logs them
("KV Transfer metrics: ...")."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from .vllm_types import KVConnectorStats

# Counter names, for docs/vllm.md: what each one counts.
FIELDS = {
    "query_requests": "requests the scheduler asked the daemon about",
    "query_hit_tokens": "tokens the daemon had (what vLLM will not compute)",
    "daemon_errors": "calls that failed because the daemon was down or slow (served as misses)",
    "loaded_blocks": "blocks copied into the KV cache",
    "load_failed_blocks": "blocks that could not be loaded (recomputed by vLLM)",
    "loaded_bytes": "bytes copied into the KV cache",
    "save_blocks": "blocks handed to the daemon to save",
    "stored_blocks": "blocks the daemon stored (new)",
    "present_blocks": "blocks the daemon already had (deduplicated)",
    "dropped_blocks": "blocks the daemon had no room for",
}


@dataclass
class PegaflowStats(KVConnectorStats):
    """Plain counters in ``data``; aggregation sums them."""

    def count(self, **increments: int) -> None:
        for key, value in increments.items():
            if value:
                self.data[key] = self.data.get(key, 0) + value

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        total: Counter[str] = Counter(self.data)
        total.update(other.data)
        return PegaflowStats(data=dict(total))

    def reduce(self) -> dict[str, int | float]:
        return {key: self.data[key] for key in FIELDS if key in self.data}

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def take(self) -> PegaflowStats | None:
        """The counts since the last call (None when nothing happened), and start again."""
        if self.is_empty():
            return None
        taken = PegaflowStats(data=dict(self.data))
        self.reset()
        return taken


def build_stats(data: dict[str, Any] | None) -> PegaflowStats:
    return PegaflowStats(data=dict(data or {}))
