"""pegaflow-rdma: pegaflow's Transport on RDMA verbs (InfiniBand, RoCE) through rdma-core's pyverbs."""

from .options import RdmaOptions
from .transport import RdmaTransport

__all__ = ["RdmaOptions", "RdmaTransport"]
