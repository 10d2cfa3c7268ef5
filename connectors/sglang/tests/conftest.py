"""Fixtures of the SGLang connector tests: a real daemon per module."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make sglang_pools importable

from sglang_pools import DAEMON_CONFIG  # noqa: E402


@pytest.fixture(scope="module")
def daemon():
    from pegaflow_core.launcher import DaemonProcess

    with DaemonProcess(DAEMON_CONFIG) as d:
        yield d
