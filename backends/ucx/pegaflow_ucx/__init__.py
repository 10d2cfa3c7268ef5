"""pegaflow UCX transport: the Transport interface on UCX (through ucxx), so one daemon speaks
TCP, shared memory, CMA, RDMA verbs or CUDA IPC to its peers, whichever UCX finds."""

from .options import UcxOptions
from .transport import UcxTransport

__all__ = ["UcxOptions", "UcxTransport"]
