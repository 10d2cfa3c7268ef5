"""Placeholder for torchvision in the CPU test venv of pegaflow-sglang, used only where no CPU
build of torchvision can be installed (this machine's package index has CUDA builds only, which
do not load next to the CPU torch build).

SGLang 0.5.23 imports torchvision at module level in its multimodal processors (InternVL, ...),
which ``sglang.srt.mem_cache`` reaches through ``sglang.srt.configs``. The connector tests never
run those processors. Every name here is a placeholder that raises as soon as it is called, so
anything that really needs torchvision fails loudly instead of computing something wrong.
setup-test-env.sh installs the real CPU wheel instead whenever it can get one.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

__version__ = "0.0.0+pegaflow-placeholder"


class _Unavailable:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> "_Unavailable":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self._name}: torchvision is a placeholder in this test venv (no CPU build available)")

    def __mro_entries__(self, bases: tuple) -> tuple:
        return (object,)


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes every ``torchvision.x.y`` import give a placeholder module."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


sys.meta_path.append(_Finder())


def __getattr__(attr: str) -> Any:
    if attr.startswith("__"):
        raise AttributeError(attr)
    return _Unavailable(f"torchvision.{attr}")
