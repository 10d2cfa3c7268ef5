"""Entry point of pegaflow-vllm in vLLM's plugin group (``vllm.general_plugins``): makes
``"kv_connector": "PegaflowConnector"`` work without ``kv_connector_module_path``. vLLM loads
general plugins in every process (scheduler and workers), which is where the name must resolve."""

from __future__ import annotations

CONNECTOR_NAME = "PegaflowConnector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:  # plugins may load twice per process
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "pegaflow_vllm.connector", CONNECTOR_NAME)
