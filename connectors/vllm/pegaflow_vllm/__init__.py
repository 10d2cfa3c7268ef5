"""pegaflow's KV connector for vLLM.

``PegaflowConnector`` is resolved lazily (module ``__getattr__``) so that importing this package,
which pegaflow's own plugin host does for ``pegaflow backends``, never imports vLLM or torch;
vLLM's ``kv_connector_module_path: "pegaflow_vllm"`` still finds the class here.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["PegaflowConnector", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "PegaflowConnector":
        from .connector import PegaflowConnector

        return PegaflowConnector
    raise AttributeError(f"module 'pegaflow_vllm' has no attribute {name!r}")
