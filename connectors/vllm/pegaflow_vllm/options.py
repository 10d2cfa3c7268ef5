"""The connector's settings, read from ``kv_connector_extra_config`` (keys ``pegaflow.*``).

Kept free of vLLM imports so ``pegaflow backends`` and the docs test can read the key list.
Unknown ``pegaflow.*`` keys are errors, not silently ignored: a misspelled endpoint would
otherwise turn into a connector that never hits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from pegaflow_core.client import DEFAULT_ENDPOINT

PREFIX = "pegaflow."
MEMORY_KINDS = ("auto", "cma", "shm", "cuda_ipc")


@dataclass(frozen=True)
class ConnectorOptions:
    """What ``pegaflow.<name>`` keys set; every field is documented in docs/vllm.md."""

    endpoint: str = DEFAULT_ENDPOINT
    """The daemon's gRPC address (``pegaflow serve --listen``); env ``PEGAFLOW_ENDPOINT`` if unset."""
    timeout_s: float = 2.0
    """Deadline of one control-plane call; past it the step treats the daemon as down (misses)."""
    retry_interval_s: float = 1.0
    """After a failed call, how long to answer 'miss' without asking the daemon again."""
    model: str = ""
    """Model name in the block namespace; default: vLLM's served model name. Set it when two
    deployments load the same weights from different paths and should share blocks."""
    memory: str = "auto"
    """How the daemon reaches the KV cache: auto (cuda_ipc on GPU; shm when the KV tensors live
    in a /dev/shm file; else cma), or force one kind."""
    save_decode: bool = True
    """Also save blocks filled by generated tokens (multi-turn chats reuse them)."""
    sync_save: bool | None = None
    """Wait for each step's Save before the step returns. Default: only for kv_producer, so a
    prefill answer implies its KV is in the daemon when the proxy starts the decode."""
    lease_ttl_s: float = 0.0
    """How long a query's hit stays pinned if nobody loads it (0: the daemon's server.lease_ttl)."""
    instance_id: str = ""
    """Name of this engine in daemon logs and stats; default: vLLM's engine_id."""

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> ConnectorOptions:
        """Parse ``kv_connector_extra_config``. Keys outside ``pegaflow.`` belong to others and
        are left alone; unknown or ill-typed ``pegaflow.`` keys raise ValueError naming the key."""
        extra = dict(extra or {})
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in extra.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX):].replace("-", "_")
            if name not in known:
                raise ValueError(
                    f"kv_connector_extra_config[{key!r}]: unknown pegaflow option; known: "
                    + ", ".join(PREFIX + n for n in known)
                )
            values[name] = _coerce(key, raw, known[name].default, name)
        if "endpoint" not in values and os.environ.get("PEGAFLOW_ENDPOINT"):
            values["endpoint"] = os.environ["PEGAFLOW_ENDPOINT"]
        options = cls(**values)
        if options.memory not in MEMORY_KINDS:
            raise ValueError(f"kv_connector_extra_config['pegaflow.memory']: expected one of {MEMORY_KINDS}, got {options.memory!r}")
        if options.timeout_s <= 0:
            raise ValueError(f"kv_connector_extra_config['pegaflow.timeout_s']: expected a number > 0, got {options.timeout_s}")
        return options


def _coerce(key: str, raw: Any, default: Any, name: str) -> Any:
    """JSON on the command line gives strings for everything users quote; accept those too."""
    where = f"kv_connector_extra_config[{key!r}]"
    if name == "sync_save" or isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "false", "0", "no"):
            return raw.lower() in ("true", "1", "yes")
        if raw is None and name == "sync_save":
            return None
        raise ValueError(f"{where}: expected true or false, got {raw!r}")
    if isinstance(default, float):
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {raw!r}") from None
    if not isinstance(raw, str):
        raise ValueError(f"{where}: expected a string, got {raw!r}")
    return raw
