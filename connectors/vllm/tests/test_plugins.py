"""How pegaflow-vllm plugs in: pegaflow's plugin host (`pegaflow backends`) without importing
vLLM, vLLM's general plugin (connector by name), and the extra-config keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("pegaflow_vllm", reason="pegaflow-vllm is not installed in this environment")

from pegaflow_vllm.options import ConnectorOptions  # noqa: E402
from pegaflow_vllm.plugin import VllmConnector  # noqa: E402
from pegaflow_core.backend import release_tuple  # noqa: E402


def test_pegaflow_plugin_load_does_not_import_vllm():
    code = ("import sys; from pegaflow_core.plugins import get_registry; r = get_registry(); "
            "print(r.get('connector', 'vllm').__name__, 'vllm' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["VllmConnector", "False", "False"]


def test_worker_half_runs_without_vllm():
    """The GPU test machine has no vLLM: the worker half (and its metadata and stats) must import
    and build its step objects with vLLM hidden, and still be vLLM's subclasses where it exists."""
    code = ("import sys; sys.modules['vllm'] = None; "
            "from pegaflow_vllm.worker_side import PegaflowWorker; "
            "from pegaflow_vllm.metadata import PegaflowMetadata, PegaflowWorkerMeta; "
            "from pegaflow_vllm.stats import PegaflowStats; "
            "s = PegaflowStats(); s.count(save_blocks=2); "
            "m = PegaflowWorkerMeta({'a'}).aggregate(PegaflowWorkerMeta({'b'})); "
            "print(s.take().to_dict()['save_blocks'], sorted(m.loaded_leases), PegaflowMetadata().loads)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "['a',", "'b']", "[]"]
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
    except ImportError:
        return
    from pegaflow_vllm.metadata import PegaflowMetadata

    assert issubclass(PegaflowMetadata, KVConnectorMetadata)


def test_backends_lists_the_connector_with_its_availability():
    out = subprocess.run([sys.executable, "-m", "pegaflow_core", "backends", "--json"], capture_output=True, text=True, check=True)
    entry = next(b for b in json.loads(out.stdout)["backends"] if b["role"] == "connector" and b["kind"] == "vllm")
    assert entry["distribution"] == "pegaflow-vllm"
    availability = VllmConnector.availability()
    assert entry["available"] == availability.ok and entry["detail"] == availability.detail


def test_version_range():
    assert release_tuple("0.33.0") == (0, 33, 0) and release_tuple("0.32.1+cpu") == (0, 32, 1)
    assert release_tuple("0.34.0rc1") == (0, 34, 0)


def test_vllm_general_plugin_registers_the_connector_by_name():
    pytest.importorskip("vllm", reason="vLLM is not installed here")
    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins(); "
        "from vllm.config import KVTransferConfig; "
        "from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory; "
        "cls = KVConnectorFactory.get_connector_class(KVTransferConfig(kv_connector='PegaflowConnector', kv_role='kv_both')); "
        "print(cls.__module__, cls.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-2:] == ["pegaflow_vllm.connector", "PegaflowConnector"]


def test_extra_config_keys():
    options = ConnectorOptions.from_extra_config({"pegaflow.endpoint": "10.0.0.1:50055", "pegaflow.save_decode": "false",
                                                  "pegaflow.timeout_s": "3", "other.key": 1})
    assert (options.endpoint, options.save_decode, options.timeout_s) == ("10.0.0.1:50055", False, 3.0)
    with pytest.raises(ValueError, match=r"'pegaflow.endpiont'\]: unknown pegaflow option; known: pegaflow.endpoint"):
        ConnectorOptions.from_extra_config({"pegaflow.endpiont": "x"})
    with pytest.raises(ValueError, match=r"pegaflow.memory'\]: expected one of"):
        ConnectorOptions.from_extra_config({"pegaflow.memory": "gpu"})
    with pytest.raises(ValueError, match="expected true or false"):
        ConnectorOptions.from_extra_config({"pegaflow.sync_save": "maybe"})
