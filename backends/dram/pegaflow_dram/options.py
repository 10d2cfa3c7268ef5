"""Options of the ``dram`` tier: one frozen dataclass the config loader validates key by key.

Each field carries ``help`` (shown by ``pegaflow config show``) and a ``check`` that the loader runs
per key, so errors name ``tiers[0].chunk`` rather than the whole tier; ``__post_init__`` runs the
same checks for options built in code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pegaflow_core import ConfigError
from pegaflow_core.backend import check_options, is_int
from pegaflow_core.sizes import Size

from .pool import PAGE
from .poolfile import POOL_NAME_RE

MIB = 1 << 20


def _check_capacity(value: int | str) -> None:
    if value != "auto" and (not is_int(value) or value <= 0):
        raise ValueError(f"expected a size above 0 like '30gb', or 'auto', got {value!r}")


def _check_chunk(value: int) -> None:
    if not is_int(value) or value <= 0 or value % PAGE:
        raise ValueError(f"expected a positive multiple of {PAGE} bytes like '64mb', got {value!r}")


def _check_pool_name(value: str | None) -> None:
    if value is not None and (not POOL_NAME_RE.fullmatch(value) or value.startswith("anon-")):
        raise ValueError(f"expected letters, digits, '.', '_' or '-' (not starting with 'anon-'), got {value!r}")


def _check_numa(value: int | str | None) -> None:
    if not (value is None or value == "auto" or (is_int(value) and value >= 0)):
        raise ValueError(f"expected 'auto', null or a NUMA node number >= 0, got {value!r}")


def _check_device(value: int) -> None:
    if not is_int(value) or value < 0:
        raise ValueError(f"expected a CUDA device number >= 0, got {value!r}")


def _check_pin(value: str) -> None:
    if value not in ("auto", "always", "never"):
        raise ValueError(f"expected 'auto', 'always' or 'never', got {value!r}")


@dataclass(frozen=True)
class DramOptions:
    """Options of the ``dram`` tier (the YAML mapping under ``- kind: dram``).

    Sizes are bytes here; the config loader turns '30gb' into bytes for ``Size`` fields. The pool
    file's name is ``pool_name``, not ``name``: in a tier list ``name`` is the tier's name in the
    stack and never reaches the options.
    """

    capacity: Size | Literal["auto"] = field(
        default="auto",
        metadata={"help": "pool size, rounded down to whole chunks; auto: a quarter of MemAvailable",
                  "check": _check_capacity},
    )
    chunk: Size = field(
        default=Size(64 * MIB),
        metadata={"help": "slab chunk size (a multiple of 4096 bytes); also the largest block the tier holds",
                  "check": _check_chunk},
    )
    shm_dir: str = field(
        default="/dev/shm",
        metadata={"help": "directory of the pool file: a tmpfs, or a hugetlbfs mount for huge pages"},
    )
    pool_name: str | None = field(
        default=None,
        metadata={"help": "pool file pegaflow-<pool_name>.pool, kept on close for a restarted daemon; "
                          "null: a private pool, removed on close", "check": _check_pool_name},
    )
    recover: bool = field(
        default=True,
        metadata={"help": "with a pool_name: serve the blocks sealed before a restart again (false, or "
                          "`pegaflow serve --cold`, starts empty)"},
    )
    verify: Literal["restart", "always"] = field(
        default="restart",
        metadata={"help": "check block checksums on the first read after a restart, or on every read"},
    )
    pin: Literal["auto", "always", "never"] = field(
        default="auto",
        metadata={"help": "page-lock the pool for the GPU (cudaHostRegister); auto: when a GPU is present",
                  "check": _check_pin},
    )
    numa: int | Literal["auto"] | None = field(
        default="auto",
        metadata={"help": "NUMA node to bind the pool to; auto: the GPU's node on multi-node machines; null: none",
                  "check": _check_numa},
    )
    device: int = field(
        default=0, metadata={"help": "CUDA device whose NUMA node numa: auto picks", "check": _check_device}
    )
    hugepages: bool = field(
        default=False, metadata={"help": "back the pool with huge pages (shm_dir on hugetlbfs, or tmpfs with huge=)"}
    )
    populate: bool = field(
        default=True, metadata={"help": "fault every page in at start, so the hot path never page-faults"}
    )

    def __post_init__(self) -> None:
        check_options(self)  # the loader runs the same checks per key; this covers options built in code



def mem_available() -> int:
    """MemAvailable from /proc/meminfo in bytes (what the kernel can give without swapping)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ConfigError("capacity: 'auto' needs MemAvailable in /proc/meminfo; give a size like '30gb'", path="capacity")
