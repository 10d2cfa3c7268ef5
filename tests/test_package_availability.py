"""How a connector says whether the engine it plugs into can run here (``pegaflow backends``)."""

from __future__ import annotations

import importlib.metadata

from pegaflow_core.backend import package_availability, release_tuple


def test_release_tuple_keeps_the_numeric_release():
    assert release_tuple("0.33.0") == (0, 33, 0) and release_tuple("0.32.1+cpu") == (0, 32, 1)
    assert release_tuple("0.6.0rc1+cu130") == (0, 6, 0) and release_tuple("2026.5") == (2026, 5)


def test_each_reason_is_named():
    version = importlib.metadata.version("pluggy")
    major = release_tuple(version)[0]
    ok = package_availability("pluggy", (major,), (major + 1,), ["pluggy"])
    assert ok.ok and ok.detail == f"pluggy {version}"
    missing = package_availability("no-such-engine", (0, 1), (0, 2), [])
    assert not missing.ok and missing.detail == "no-such-engine is not installed (pip install 'no-such-engine>=0.1,<0.2')"
    old = package_availability("pluggy", (major + 1,), (major + 2,), ["pluggy"])
    assert not old.ok and old.detail == f"pluggy {version} is outside the supported range >={major + 1},<{major + 2}"
    broken = package_availability("pluggy", (major,), (major + 1,), ["pluggy.no_such_module"])
    assert not broken.ok and broken.detail.startswith(f"pluggy {version} does not import: ModuleNotFoundError")
