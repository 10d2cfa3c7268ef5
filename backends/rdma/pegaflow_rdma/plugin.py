"""Entry point of pegaflow-rdma (group ``pegaflow``, name ``rdma``). Importing it imports neither
pyverbs nor numpy-heavy code paths: the transport opens devices when built, and ``availability``
reads sysfs before it tries pyverbs."""

from __future__ import annotations

from pegaflow_core import hookimpl
from pegaflow_core.hookspecs import Register


@hookimpl
def register_transports(register: Register) -> None:
    """Register the RDMA verbs transport (kind 'rdma')."""
    from .transport import RdmaTransport

    register(RdmaTransport)
