"""Options of the ``ssd`` tier: one frozen dataclass the config loader validates key by key.

Each field carries ``help`` (shown by ``pegaflow config show``) and a ``check`` the loader runs per
key, so errors name ``tiers[2].segment_size`` rather than the whole tier; ``__post_init__`` runs the
same checks (and the cross-field ones) for options built in code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pegaflow_core import InvalidArgument
from pegaflow_core.backend import check_options, is_int
from pegaflow_core.sizes import Size, format_size

from .format import PAGE

MIB = 1 << 20
MAX_QUEUE_DEPTH = 1024



def _check_path(value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a directory path like '/var/cache/pegaflow', got an empty string")


def _check_capacity(value: int) -> None:
    if not is_int(value) or value <= 0:
        raise ValueError(f"expected a size above 0 like '1tb', got {value!r}")


def _check_segment_size(value: int) -> None:
    if not is_int(value) or value < 2 * PAGE or value % PAGE:
        raise ValueError(f"expected a multiple of {PAGE} bytes of at least {2 * PAGE} like '256mb', got {value!r}")


def _check_queue_depth(value: int) -> None:
    if not is_int(value) or not 1 <= value <= MAX_QUEUE_DEPTH:
        raise ValueError(f"expected an integer from 1 to {MAX_QUEUE_DEPTH}, got {value!r}")


def _check_io(value: str) -> None:
    if value not in ("auto", "io_uring", "threads"):
        raise ValueError(f"expected 'auto', 'io_uring' or 'threads', got {value!r}")


@dataclass(frozen=True)
class SsdOptions:
    """Options of the ``ssd`` tier (the YAML mapping under ``- kind: ssd``)."""

    path: str = field(
        metadata={"help": "directory of the segment files (created if missing); one tier per directory",
                  "check": _check_path},
    )
    capacity: Size = field(
        metadata={"help": "total bytes of segment files; one segment of it is kept free for compaction",
                  "check": _check_capacity},
    )
    segment_size: Size = field(
        default=Size(256 * MIB),
        metadata={"help": "size of each segment (log) file, a multiple of 4096; also bounds the largest block",
                  "check": _check_segment_size},
    )
    queue_depth: int = field(
        default=32, metadata={"help": "I/Os kept in flight per batch", "check": _check_queue_depth}
    )
    io: Literal["auto", "io_uring", "threads"] = field(
        default="auto",
        metadata={"help": "I/O path: io_uring (liburing) or a thread pool of preadv/pwritev; "
                          "auto: io_uring when it works here", "check": _check_io},
    )
    fsync: bool = field(
        default=True,
        metadata={"help": "fdatasync after each batch, so an acknowledged put also survives power loss "
                          "(a process crash never loses one either way)"},
    )
    background_load: bool = field(
        default=False,
        metadata={"help": "rebuild the index in a background thread: the daemon starts at once and reports the "
                          "tier as loading; until then reads miss and writes wait"},
    )
    write_through: bool = field(
        default=False,
        metadata={"help": "read by the tier stack: write every saved block through to this tier as well, "
                          "not only blocks spilled from above"},
    )

    def __post_init__(self) -> None:
        check_options(self)  # the loader runs the same checks per key; this covers options built in code
        if self.capacity < 2 * self.segment_size:
            raise InvalidArgument(
                f"capacity: {format_size(self.capacity)} holds fewer than two segments of "
                f"{format_size(self.segment_size)}; the tier needs one segment of data plus one kept free "
                f"for compaction: raise capacity to at least {2 * self.segment_size} bytes or lower segment_size"
            )
