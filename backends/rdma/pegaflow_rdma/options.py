"""``RdmaOptions``: the YAML ``transport: {kind: rdma, ...}`` keys, validated by pegaflow's config
loader against the field types and checks below (and by ``__post_init__`` when built in Python).

Every field has a default, so ``transport: {kind: rdma}`` works on any machine with an active RDMA
port; the defaults are sized for KV blocks of 64 KiB to a few MiB.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pegaflow_core.backend import check_options
from pegaflow_core.errors import InvalidArgument
from pegaflow_core.sizes import Duration, Size

_DEVICE_RE = re.compile(r"^[A-Za-z0-9_.-]+(:[0-9]+)?$")
_PCI_RE = re.compile(r"^([0-9a-fA-F]{4,8}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")


def parse_devices(value: str) -> list[tuple[str, int | None]]:
    """``"mlx5_0,mlx5_1:2"`` as ``[("mlx5_0", None), ("mlx5_1", 2)]``; ``"auto"`` as ``[]``."""
    if value.strip() == "auto":
        return []
    out: list[tuple[str, int | None]] = []
    for item in value.split(","):
        item = item.strip()
        if not _DEVICE_RE.match(item):
            raise ValueError(
                f"expected 'auto' or a comma-separated list of RDMA device names such as 'mlx5_0,mlx5_1' "
                f"(optionally with a port: 'mlx5_0:1'), got {value!r}"
            )
        name, _, port = item.partition(":")
        if port and int(port) < 1:
            raise ValueError(f"expected a port number >= 1 in {item!r}")
        out.append((name, int(port) if port else None))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"a device is listed twice in {value!r}")
    return out


def _check_devices(value: str) -> None:
    parse_devices(value)


def _range(low: int, high: int, what: str):
    def check(value: int) -> None:
        if not low <= value <= high:
            raise ValueError(f"expected {what} between {low} and {high}, got {value}")
    return check


def _check_port(value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port 0..65535 (0 = pick a free one), got {value}")


def _check_gid_index(value: int) -> None:
    if value < -1:
        raise ValueError(f"expected a GID table index >= 0, or -1 to pick one (RoCE v2 with an IPv4 address first), got {value}")


def _check_numa(value: int) -> None:
    if value < -2:
        raise ValueError(f"expected a NUMA node >= 0, -1 for the node this daemon is pinned to, or -2 for any, got {value}")


def _check_pci(value: str) -> None:
    if value and not _PCI_RE.match(value):
        raise ValueError(f"expected a PCI address such as '0000:17:00.0' (nvidia-smi --query-gpu=pci.bus_id), got {value!r}")


def _check_wr_size(value: int) -> None:
    if not 4096 <= value <= 1 << 30:
        raise ValueError(f"expected a work-request size between 4kb and 1gb, got {value}")


def _check_mr_chunk(value: int) -> None:
    if value and value < 1 << 20:
        raise ValueError(f"expected 0 (one memory region per buffer, split only above the device's limit) or at least 1mb, got {value}")


def _check_non_negative(value: float) -> None:
    if value < 0:
        raise ValueError(f"expected a duration >= 0 such as '2s' (0: automatic), got {value}")


def _check_timeout(value: float) -> None:
    if not value > 0:
        raise ValueError(f"expected a duration above 0 such as '30s', got {value}")


@dataclass(frozen=True)
class RdmaOptions:
    """Which NICs, how many queue pairs, and how transfers are cut into work requests."""

    devices: str = field(
        default="auto",
        metadata={"help": "RDMA devices to use, e.g. 'mlx5_0,mlx5_1' or 'mlx5_0:1' (device:port); 'auto': every "
                          "active port, narrowed to those nearest gpu_pci, else to numa_node",
                  "check": _check_devices},
    )
    numa_node: int = field(
        default=-1,
        metadata={"help": "with devices: auto, prefer NICs on this NUMA node; -1: the node this daemon is pinned "
                          "to (numactl --cpunodebind), if it is; -2: any", "check": _check_numa},
    )
    gpu_pci: str = field(
        default="",
        metadata={"help": "with devices: auto, prefer the NICs closest to this GPU on the PCIe tree "
                          "(nvidia-smi --query-gpu=pci.bus_id); empty: use numa_node", "check": _check_pci},
    )
    gid_index: int = field(
        default=-1,
        metadata={"help": "GID table index on every port; -1 picks RoCE v2 with an IPv4 address, then any RoCE v2, "
                          "then index 0 (InfiniBand)", "check": _check_gid_index},
    )
    qps_per_nic: int = field(
        default=2,
        metadata={"help": "RC queue pairs per peer and NIC; work requests are striped over all of them",
                  "check": _range(1, 64, "a queue-pair count")},
    )
    queue_depth: int = field(
        default=128,
        metadata={"help": "work requests in flight per queue pair (capped by the device)",
                  "check": _range(1, 32768, "a queue depth")},
    )
    max_sge: int = field(
        default=16,
        metadata={"help": "scatter/gather entries per work request: adjacent ops on the peer become one "
                          "request (capped by the device)", "check": _range(1, 1024, "an SGE count")},
    )
    wr_size: Size = field(
        default=Size(1 << 20),
        metadata={"help": "largest work request; bigger ops are cut, so one large op is striped over NICs",
                  "check": _check_wr_size},
    )
    mr_chunk: Size = field(
        default=Size(0),
        metadata={"help": "register buffers as memory regions of at most this size; 0: one region per buffer "
                          "unless the device's max_mr_size is smaller", "check": _check_mr_chunk},
    )
    retry_cnt: int = field(
        default=7,
        metadata={"help": "transport retries of a queue pair before it fails (IB retry_cnt)",
                  "check": _range(0, 7, "a retry count")},
    )
    ack_timeout: int = field(
        default=14,
        metadata={"help": "IB local ACK timeout exponent: 4.096 us * 2^n per try (14: about 67 ms)",
                  "check": _range(1, 31, "an ACK timeout exponent")},
    )
    resubmits: int = field(
        default=1,
        metadata={"help": "times a work request that failed for lack of an answer (retry exceeded) is posted "
                          "again on a fresh queue pair before its batch fails", "check": _range(0, 16, "a count")},
    )
    stall_timeout: Duration = field(
        default=Duration(0.0),
        metadata={"help": "a queue pair with requests out and no completion for this long is flushed and replaced, "
                          "its requests posted again; 0: twice the NIC's own retry time (ack_timeout, retry_cnt), "
                          "at least 3s", "check": _check_non_negative},
    )
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "address the connection-setup listener binds and peers dial (rdma://host:port)"},
    )
    port: int = field(default=0, metadata={"help": "connection-setup listener port; 0 picks a free one",
                                           "check": _check_port})
    timeout: Duration = field(
        default=Duration(30.0),
        metadata={"help": "timeout of connect() and of a read/write batch when the caller passes none",
                  "check": _check_timeout},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip():
            raise InvalidArgument(f"rdma.host: expected a host name or IP such as '10.0.0.1', got {self.host!r}")
        for name in ("numa_node", "gid_index", "qps_per_nic", "queue_depth", "max_sge", "wr_size", "mr_chunk",
                     "retry_cnt", "ack_timeout", "resubmits", "port"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidArgument(f"rdma.{name}: expected an integer, got {value!r}")
        for name in ("devices", "gpu_pci"):
            if not isinstance(getattr(self, name), str):
                raise InvalidArgument(f"rdma.{name}: expected a string, got {getattr(self, name)!r}")
        try:
            check_options(self)
        except InvalidArgument as exc:
            raise InvalidArgument(f"rdma.{exc}") from None
