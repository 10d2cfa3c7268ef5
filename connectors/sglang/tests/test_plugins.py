"""How pegaflow-sglang plugs in and names its blocks, without SGLang or torch: pegaflow's plugin
host (`pegaflow backends`), the version range, the options, the key and namespace rules, and
that every option is documented."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pegaflow_sglang", reason="pegaflow-sglang is not installed in this environment")

from pegaflow_sglang.naming import PageFormat, Placement, page_hash, valid_prefix  # noqa: E402
from pegaflow_sglang.options import SglangOptions  # noqa: E402
from pegaflow_sglang.plugin import SglangConnector  # noqa: E402
from pegaflow_core.backend import release_tuple  # noqa: E402

DOCS = Path(__file__).resolve().parents[3] / "docs" / "sglang.md"


def test_pegaflow_plugin_load_does_not_import_sglang():
    code = ("import sys; from pegaflow_core.plugins import get_registry; r = get_registry(); "
            "import pegaflow_sglang; "
            "print(r.get('connector', 'sglang').__name__, 'sglang' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["SglangConnector", "False", "False"]


def test_backends_lists_the_connector_with_its_availability():
    out = subprocess.run([sys.executable, "-m", "pegaflow_core", "backends", "--json"], capture_output=True, text=True, check=True)
    entry = next(b for b in json.loads(out.stdout)["backends"] if b["role"] == "connector" and b["kind"] == "sglang")
    assert entry["distribution"] == "pegaflow-sglang"
    availability = SglangConnector.availability()
    assert entry["available"] == availability.ok and entry["detail"] == availability.detail


def test_version_range():
    assert release_tuple("0.5.23") == (0, 5, 23) and release_tuple("0.6.0rc1+cu130") == (0, 6, 0)
    low, high = (0, 5, 23), (0, 6)
    assert low <= release_tuple("0.5.24") < high and not release_tuple("0.5.9") >= low


def test_options():
    options = SglangOptions.from_mapping({"backend_name": "pegaflow", "module_path": "pegaflow_sglang", "interface_v1": 1,
                                          "endpoint": "10.0.0.1:50055", "timeout_s": "3", "staging_pages": "8"}, "cfg")
    assert (options.endpoint, options.timeout_s, options.staging_pages) == ("10.0.0.1:50055", 3.0, 8)
    with pytest.raises(ValueError, match=r"cfg\['endpiont'\]: unknown pegaflow option; known: .*endpoint"):
        SglangOptions.from_mapping({"endpiont": "x"}, "cfg")
    with pytest.raises(ValueError, match=r"cfg\['staging_pages'\]: expected an integer"):
        SglangOptions.from_mapping({"staging_pages": 1.5}, "cfg")
    with pytest.raises(ValueError, match=r"expected an integer >= 1"):
        SglangOptions.from_mapping({"staging_pages": 0}, "cfg")
    with pytest.raises(ValueError, match="expected a JSON object"):
        SglangOptions.from_mapping(["endpoint"], "cfg")  # type: ignore[arg-type]


def test_every_option_is_documented():
    text = DOCS.read_text()
    missing = [f.name for f in dataclasses.fields(SglangOptions) if f"`{f.name}`" not in text]
    assert not missing, f"options missing from {DOCS}: {missing}"


def test_page_keys():
    digest = "ab" * 32
    assert page_hash(digest) == bytes.fromhex(digest)
    assert len(page_hash("key with spaces")) == 32 and page_hash("abc") != page_hash("abd")
    assert page_hash("ABCD") == bytes.fromhex("abcd")
    for bad in ("", None, 7, b"bytes"):
        with pytest.raises(ValueError, match="non-empty string page key"):
            page_hash(bad)
    assert valid_prefix([digest, "ok", None, digest])[1] == 2


def test_namespaces_separate_what_must_not_mix():
    fmt = PageFormat(order="token-major", dtype="torch.bfloat16", page_size=64, num_layers=32, page_bytes=1 << 20, mla=False)
    base = Placement("llama", tp_rank=0, tp_size=2)
    ns = base.namespace(fmt)
    assert ns.startswith("llama@")
    assert Placement("llama", tp_rank=1, tp_size=2).namespace(fmt) == ns  # same split: ranks differ by shard
    assert base.shard(False) == 0 and Placement("llama", tp_rank=1, tp_size=2).shard(False) == 1
    others = [
        Placement("qwen", tp_size=2).namespace(fmt),
        Placement("llama", tp_size=4).namespace(fmt),
        Placement("llama", tp_size=2, pp_rank=1, pp_size=2).namespace(fmt),
        base.namespace(dataclasses.replace(fmt, order="layer-major")),
        base.namespace(dataclasses.replace(fmt, dtype="torch.float8_e4m3fn")),
        base.namespace(dataclasses.replace(fmt, page_size=32)),
    ]
    assert ns not in others and len(set(others)) == len(others)
    mla = dataclasses.replace(fmt, mla=True)
    assert Placement("ds", tp_rank=3, tp_size=8).namespace(mla) == Placement("ds", tp_size=1).namespace(mla)
    assert Placement("ds", tp_rank=3, tp_size=8).shard(True) == 0
