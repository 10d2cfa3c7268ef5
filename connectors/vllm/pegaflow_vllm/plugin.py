"""Entry point of pegaflow-vllm in pegaflow's plugin group (``pegaflow``, name ``vllm``), so that
``pegaflow backends`` lists the connector and says whether the installed vLLM can run it.

Importing this module must stay cheap: it never imports vLLM or torch. Only ``availability()``
does, when someone asks.
"""

from __future__ import annotations

import importlib.metadata
import re
from typing import ClassVar

from pegaflow_core import hookimpl
from pegaflow_core.backend import Availability
from pegaflow_core.hookspecs import Register

SUPPORTED = ((0, 32), (0, 34))  # vLLM versions [0.32, 0.34): the KVConnectorBase_V1 API we implement


def _version_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric release parts: "0.34.0rc1" -> (0, 34, 0), "0.32.1+cpu" -> (0, 32, 1)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.group() != piece:
            break
    return tuple(parts)


class VllmConnector:
    """Descriptor of the vLLM connector (the connector class itself lives in pegaflow_vllm.connector)."""

    kind: ClassVar[str] = "vllm"
    connector_class: ClassVar[str] = "pegaflow_vllm.connector:PegaflowConnector"

    @classmethod
    def availability(cls) -> Availability:
        """vLLM installed, in the supported range, and its connector API importable."""
        try:
            version = importlib.metadata.version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return Availability(False, "vllm is not installed (pip install 'vllm>=0.32,<0.34')")
        low, high = SUPPORTED
        if not low <= _version_tuple(version)[:2] < high:
            return Availability(False, f"vllm {version} is outside the supported range "
                                       f">={low[0]}.{low[1]},<{high[0]}.{high[1]}")
        try:
            import vllm.distributed.kv_transfer.kv_connector.v1.base  # noqa: F401
        except Exception as exc:  # a broken install must show up here, not crash the listing
            return Availability(False, f"vllm {version} does not import: {type(exc).__name__}: {exc}")
        return Availability(True, f"vllm {version}")


@hookimpl
def register_connectors(register: Register) -> None:
    """Register the vLLM connector descriptor (kind 'vllm')."""
    register(VllmConnector)
