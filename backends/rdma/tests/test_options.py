"""RdmaOptions from YAML and from Python: every bad value names its key and what was expected."""

from __future__ import annotations

import pytest

from pegaflow_core.config import options_from_mapping
from pegaflow_core.errors import ConfigError, InvalidArgument
from pegaflow_core.plugins import get_registry
from pegaflow_rdma import RdmaOptions, RdmaTransport
from pegaflow_rdma.options import parse_devices


def test_defaults_need_no_settings() -> None:
    options = options_from_mapping(RdmaOptions, None, file="stack.yaml", path="transport")
    assert options == RdmaOptions()
    assert options.devices == "auto" and options.qps_per_nic >= 1 and options.wr_size == 1 << 20


def test_options_from_yaml_mapping() -> None:
    options = options_from_mapping(
        RdmaOptions,
        {"devices": "mlx5_0,mlx5_1:2", "qps_per_nic": 4, "wr_size": "512kb", "mr_chunk": "1gb", "timeout": "500ms",
         "gpu_pci": "0000:17:00.0", "host": "10.0.0.1", "port": 18515},
        file="stack.yaml", path="transport",
    )
    assert options.wr_size == 512 << 10 and options.mr_chunk == 1 << 30 and options.timeout == 0.5
    assert parse_devices(options.devices) == [("mlx5_0", None), ("mlx5_1", 2)]


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"devices": "mlx5_0;rm -rf"}, r"transport\.devices: expected 'auto' or a comma-separated list of RDMA device names"),
        ({"devices": "mlx5_0,mlx5_0"}, r"transport\.devices: a device is listed twice"),
        ({"devices": "mlx5_0:0"}, r"transport\.devices: expected a port number >= 1"),
        ({"qps_per_nic": 0}, r"transport\.qps_per_nic: expected a queue-pair count between 1 and 64"),
        ({"queue_depth": 100000}, r"transport\.queue_depth: expected a queue depth between 1 and 32768"),
        ({"max_sge": 0}, r"transport\.max_sge: expected an SGE count"),
        ({"wr_size": "1kb"}, r"transport\.wr_size: expected a work-request size between 4kb and 1gb"),
        ({"mr_chunk": "4kb"}, r"transport\.mr_chunk: expected 0 .* or at least 1mb"),
        ({"retry_cnt": 8}, r"transport\.retry_cnt: expected a retry count between 0 and 7"),
        ({"ack_timeout": 0}, r"transport\.ack_timeout: expected an ACK timeout exponent"),
        ({"gid_index": -5}, r"transport\.gid_index: expected a GID table index >= 0, or -1"),
        ({"gpu_pci": "gpu0"}, r"transport\.gpu_pci: expected a PCI address such as '0000:17:00\.0'"),
        ({"numa_node": -3}, r"transport\.numa_node: expected a NUMA node >= 0"),
        ({"port": 70000}, r"transport\.port: expected a port 0\.\.65535"),
        ({"timeout": 0}, r"transport\.timeout: expected a duration above 0"),
        ({"qps_per_nic": "two"}, r"transport\.qps_per_nic: expected"),
        ({"qps_per_nic": True}, r"transport\.qps_per_nic: expected"),
        ({"qp_per_nic": 2}, r"qp_per_nic"),
    ],
)
def test_bad_options_name_the_key(mapping, message) -> None:
    with pytest.raises(ConfigError, match=message):
        options_from_mapping(RdmaOptions, mapping, file="stack.yaml", path="transport")


def test_options_checked_in_python_too() -> None:
    with pytest.raises(InvalidArgument, match=r"rdma\.host"):
        RdmaOptions(host=" ")
    with pytest.raises(InvalidArgument, match=r"rdma\.qps_per_nic: expected a queue-pair count"):
        RdmaOptions(qps_per_nic=0)
    with pytest.raises(InvalidArgument, match=r"rdma\.devices: expected 'auto'"):
        RdmaOptions(devices="a b")
    with pytest.raises(InvalidArgument, match=r"rdma\.max_sge: expected an integer"):
        RdmaOptions(max_sge=2.5)


def test_registered_through_the_entry_point() -> None:
    assert get_registry(reload=True).get("transport", "rdma") is RdmaTransport
