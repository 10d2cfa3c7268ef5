"""``UcxOptions``: the YAML ``transport: {kind: ucx, ...}`` keys, validated by pegaflow's config
loader against the field types below.

UCX reads its ``UCX_*`` settings when a UCP context is created. pegaflow does not set environment
variables for these options: it hands them to the one context each ``UcxTransport`` creates
(``ucp_config_modify`` through ucxx's ``config_dict``), so two transports in one process may use
different settings, and a value given here wins over the same ``UCX_*`` variable in the environment.
Settings with no option here (``UCX_RNDV_THRESH``, ``UCX_LOG_LEVEL``, ...) still come from the
environment, which must then be set before the process creates its first transport.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pegaflow_core.errors import InvalidArgument
from pegaflow_core.sizes import Duration, Size

_TLS_RE = re.compile(r"^\^?[A-Za-z0-9_:]+(,[A-Za-z0-9_:]+)*$")
_DEVICES_RE = re.compile(r"^[A-Za-z0-9_.:-]+(,[A-Za-z0-9_.:-]+)*$")


def _check_tls(value: str) -> None:
    if value and not _TLS_RE.match(value):
        raise ValueError(
            f"expected a UCX_TLS list such as 'tcp,cma,sm', 'rc,cuda_ipc' or '^ib' (empty: UCX decides), got {value!r}"
        )


def _check_devices(value: str) -> None:
    if value and not _DEVICES_RE.match(value):
        raise ValueError(
            f"expected a UCX_NET_DEVICES list such as 'eth0' or 'mlx5_0:1,mlx5_1:1' (empty: all), got {value!r}"
        )


def _check_port(value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port 0..65535 (0 = pick a free one), got {value}")


def _check_seg_size(value: int) -> None:
    if value and not 1024 <= value <= 1 << 30:
        raise ValueError(f"expected a TCP segment size between 1kb and 1gb (0: UCX default, 64 KiB), got {value}")


def _check_timeout(value: float) -> None:
    if not value > 0:
        raise ValueError(f"expected a duration above 0 such as '30s', got {value}")


@dataclass(frozen=True)
class UcxOptions:
    """Where the endpoint listens and which UCX transports it may use. Every field has a default,
    so ``transport: {kind: ucx}`` works on any machine."""

    host: str = field(
        default="127.0.0.1",
        metadata={"help": "address peers dial to reach this endpoint (ucxx listens on every interface, on 'port')"},
    )
    port: int = field(
        default=0,
        metadata={"help": "listener port; 0 picks a free one", "check": _check_port},
    )
    tls: str = field(
        default="",
        metadata={"help": "UCX_TLS: transports UCX may use, e.g. 'tcp,cma,sm' or 'rc,cuda_ipc'; empty: UCX decides",
                  "check": _check_tls},
    )
    net_devices: str = field(
        default="",
        metadata={"help": "UCX_NET_DEVICES: NICs UCX may use, e.g. 'mlx5_0:1' or 'eth0'; empty: all",
                  "check": _check_devices},
    )
    seg_size: Size = field(
        default=Size(1 << 20),
        metadata={"help": "UCX_TCP_TX_SEG_SIZE and UCX_TCP_RX_SEG_SIZE; 1mb about doubles TCP throughput "
                          "over UCX's 64kb default; 0 keeps UCX's default", "check": _check_seg_size},
    )
    error_handling: bool = field(
        default=True,
        metadata={"help": "UCX peer error handling: a dead peer fails transfers at once. UCX then uses only "
                          "transports that detect failures (tcp, verbs), not shared memory or CMA; false lets it "
                          "use them (2-3x faster on one host) but a dead peer is only noticed at the "
                          "transfer's timeout. Must be the same on every endpoint"},
    )
    timeout: Duration = field(
        default=Duration(30.0),
        metadata={"help": "timeout of connect() and of a read/write batch when the caller passes none",
                  "check": _check_timeout},
    )

    def __post_init__(self) -> None:
        # The config loader runs the checks above; these cover direct construction in Python.
        if not isinstance(self.error_handling, bool):
            raise InvalidArgument(f"ucx.error_handling: expected true or false, got {self.error_handling!r}")
        if not isinstance(self.host, str) or not self.host.strip():
            raise InvalidArgument(f"ucx.host: expected a host name or IP such as '127.0.0.1', got {self.host!r}")
        for name, check in (("port", _check_port), ("tls", _check_tls), ("net_devices", _check_devices),
                            ("seg_size", _check_seg_size), ("timeout", _check_timeout)):
            try:
                check(getattr(self, name))
            except (ValueError, TypeError) as exc:
                raise InvalidArgument(f"ucx.{name}: {exc}") from None

    def ucx_config(self) -> dict[str, str]:
        """The UCX settings these options stand for, without the ``UCX_`` prefix, as
        ``ucp_config_modify`` takes them. Only what was set away from "UCX decides" is listed."""
        config: dict[str, str] = {}
        if self.tls:
            config["TLS"] = self.tls
        if self.net_devices:
            config["NET_DEVICES"] = self.net_devices
        if self.seg_size:
            config["TCP_TX_SEG_SIZE"] = str(self.seg_size)
            config["TCP_RX_SEG_SIZE"] = str(self.seg_size)
        return config
