"""Options of the ``gds`` tier: every ``ssd`` option (same directory format, same meaning) plus the
three that choose how GPU I/O runs. Checked per key by the config loader, like the ssd tier's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pegaflow_core.backend import is_int

from pegaflow_ssd import SsdOptions

MAX_THREADS = 256


def _check_direct(value: str) -> None:
    if value not in ("auto", "always", "never"):
        raise ValueError(f"expected 'auto', 'always' or 'never', got {value!r}")


def _check_compat(value: str) -> None:
    if value not in ("auto", "on", "off"):
        raise ValueError(f"expected 'auto', 'on' or 'off', got {value!r}")


def _check_threads(value: int) -> None:
    if not is_int(value) or not 1 <= value <= MAX_THREADS:
        raise ValueError(f"expected an integer from 1 to {MAX_THREADS}, got {value!r}")


@dataclass(frozen=True)
class GdsOptions(SsdOptions):
    """Options of the ``gds`` tier (the YAML mapping under ``- kind: gds``)."""

    direct: Literal["auto", "always", "never"] = field(
        default="auto",
        metadata={"help": "loads of this tier's hits into GPU memory: 'always' straight from the file (cuFile), "
                          "'never' through the DRAM pool, 'auto' straight only with real GDS (nvidia-fs), "
                          "since compat mode reads slower than O_DIRECT to host",
                  "check": _check_direct},
    )
    compat: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={"help": "kvikio compatibility mode: 'auto' uses cuFile where GDS is set up and POSIX with a "
                          "bounce buffer elsewhere, 'on' always POSIX, 'off' requires GDS (the tier refuses to open)",
                  "check": _check_compat},
    )
    threads: int = field(
        default=16,
        metadata={"help": "kvikio's I/O thread pool (process-wide: the last gds tier opened sets it)",
                  "check": _check_threads},
    )
