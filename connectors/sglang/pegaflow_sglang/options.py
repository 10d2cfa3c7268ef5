"""The connector's settings: the HiCache route reads them from
``--hicache-storage-backend-extra-config`` (a JSON object SGLang hands to the backend), the
radix-cache route from the environment variable ``PEGAFLOW_SGLANG_CONFIG`` (the same JSON keys;
SGLang has no per-backend config flag there).

Kept free of SGLang and torch imports. Unknown keys are errors, not silently ignored: a misspelled
endpoint would otherwise turn into a cache that never hits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from pegaflow_core.client import DEFAULT_ENDPOINT

MEMORY_KINDS = ("auto", "cma", "shm", "cuda_ipc")
LOAD_MODES = ("layerwise", "sync")
CONFIG_ENV = "PEGAFLOW_SGLANG_CONFIG"
# Keys SGLang itself puts in or reads from the extra config of a dynamic backend.
SGLANG_KEYS = frozenset({"backend_name", "module_path", "class_name", "interface_v1", "tp_lcm_size"})


@dataclass(frozen=True)
class SglangOptions:
    """What each key sets; every field is documented in docs/sglang.md."""

    endpoint: str = DEFAULT_ENDPOINT
    """The daemon's gRPC address (``pegaflow serve --listen``); env ``PEGAFLOW_ENDPOINT`` if unset."""
    model: str = ""
    """Model name in the block namespace; default: SGLang's model name (``--served-model-name`` or
    the model path). Set it when two deployments load the same weights from different paths."""
    timeout_s: float = 2.0
    """Deadline of one control-plane call; past it the call counts as a miss."""
    retry_interval_s: float = 1.0
    """After a failed call, how long to answer 'miss' without asking the daemon again."""
    memory: str = "auto"
    """How the daemon reaches the KV memory: auto (cuda_ipc for GPU tensors; shm when the tensor
    lives in a /dev/shm file; else cma), or force one kind."""
    lease_ttl_s: float = 0.0
    """How long a query's hit stays pinned if nobody loads it (0: the daemon's server.lease_ttl)."""
    staging_pages: int = 16
    """Pages of the bounce buffer used by the key-based (copying) calls of older SGLang releases."""
    load_mode: str = "layerwise"
    """Radix-cache route: 'layerwise' lets layer i compute while later layers load; 'sync' waits
    for the whole load before admitting the request (a failed load then means recompute)."""
    instance_id: str = ""
    """Name of this engine in daemon logs and stats; default: sglang-<pid>."""

    @classmethod
    def from_mapping(cls, extra: Mapping[str, Any] | None, where: str) -> SglangOptions:
        """Parse a config mapping. ``where`` names its origin in error messages."""
        if extra is not None and not isinstance(extra, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(extra).__name__}")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in (extra or {}).items():
            if key in SGLANG_KEYS:
                continue
            name = str(key).replace("-", "_")
            if name not in known:
                raise ValueError(f"{where}[{key!r}]: unknown pegaflow option; known: {', '.join(sorted(known))}")
            values[name] = _coerce(f"{where}[{key!r}]", raw, known[name].default)
        if "endpoint" not in values and os.environ.get("PEGAFLOW_ENDPOINT"):
            values["endpoint"] = os.environ["PEGAFLOW_ENDPOINT"]
        options = cls(**values)
        if options.memory not in MEMORY_KINDS:
            raise ValueError(f"{where}['memory']: expected one of {MEMORY_KINDS}, got {options.memory!r}")
        if options.load_mode not in LOAD_MODES:
            raise ValueError(f"{where}['load_mode']: expected one of {LOAD_MODES}, got {options.load_mode!r}")
        if options.timeout_s <= 0:
            raise ValueError(f"{where}['timeout_s']: expected a number > 0, got {options.timeout_s}")
        if options.staging_pages < 1:
            raise ValueError(f"{where}['staging_pages']: expected an integer >= 1, got {options.staging_pages}")
        return options

    @classmethod
    def from_env(cls) -> SglangOptions:
        """The radix-cache route's options: ``PEGAFLOW_SGLANG_CONFIG`` (JSON), or defaults."""
        text = os.environ.get(CONFIG_ENV, "").strip()
        if not text:
            return cls.from_mapping({}, CONFIG_ENV)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{CONFIG_ENV}: not valid JSON ({exc}): {text[:80]!r}") from None
        return cls.from_mapping(data, CONFIG_ENV)


def _coerce(where: str, raw: Any, default: Any) -> Any:
    """JSON written on a command line often quotes numbers; accept those too."""
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        raise ValueError(f"{where}: expected true or false, got {raw!r}")
    if isinstance(default, int):
        if isinstance(raw, bool) or not (isinstance(raw, int) or (isinstance(raw, str) and raw.strip().isdigit())):
            raise ValueError(f"{where}: expected an integer, got {raw!r}")
        return int(raw)
    if isinstance(default, float):
        if isinstance(raw, bool):
            raise ValueError(f"{where}: expected a number, got {raw!r}")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {raw!r}") from None
    if not isinstance(raw, str):
        raise ValueError(f"{where}: expected a string, got {raw!r}")
    return raw
