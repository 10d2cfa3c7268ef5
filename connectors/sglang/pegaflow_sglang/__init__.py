"""pegaflow's connector for SGLang: the HiCache storage backend ``PegaflowStore`` and the
GPU-direct radix-cache backend ``pegaflow`` (``PegaflowRadixCache``).

Both classes resolve lazily (module ``__getattr__``) so that importing this package, which
pegaflow's plugin host does for ``pegaflow backends``, never imports SGLang or torch; SGLang's
``module_path: "pegaflow_sglang"`` still finds ``PegaflowStore`` here.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["PegaflowRadixCache", "PegaflowStore", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "PegaflowStore":
        from .store import PegaflowStore

        return PegaflowStore
    if name == "PegaflowRadixCache":
        from .radix import PegaflowRadixCache

        return PegaflowRadixCache
    raise AttributeError(f"module 'pegaflow_sglang' has no attribute {name!r}")
