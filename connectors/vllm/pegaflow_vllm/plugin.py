"""Entry point of pegaflow-vllm in pegaflow's plugin group (``pegaflow``, name ``vllm``), so that
``pegaflow backends`` lists the connector and says whether the installed vLLM can run it.

Importing this module must stay cheap: it never imports vLLM or torch. Only ``availability()``
does, when someone asks.
"""

from __future__ import annotations

from typing import ClassVar

from pegaflow_core import hookimpl
from pegaflow_core.backend import Availability, package_availability
from pegaflow_core.hookspecs import Register

SUPPORTED = ((0, 32), (0, 34))  # vLLM versions [0.32, 0.34): the KVConnectorBase_V1 API we implement


class VllmConnector:
    """Descriptor of the vLLM connector (the connector class itself lives in pegaflow_vllm.connector)."""

    kind: ClassVar[str] = "vllm"
    connector_class: ClassVar[str] = "pegaflow_vllm.connector:PegaflowConnector"

    @classmethod
    def availability(cls) -> Availability:
        """vLLM installed, in the supported range, and its connector API importable."""
        return package_availability("vllm", *SUPPORTED, ["vllm.distributed.kv_transfer.kv_connector.v1.base"])


@hookimpl
def register_connectors(register: Register) -> None:
    """Register the vLLM connector descriptor (kind 'vllm')."""
    register(VllmConnector)
