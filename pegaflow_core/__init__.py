"""pegaflow: a per-machine KV-cache service for LLM inference engines.

This façade exports what plugin authors and connector writers need: the three interfaces, block
keys, the plugin marker and the errors. Everything else lives in submodules.
"""

from .backend import Availability, Backend, NoOptions
from .buffers import Buffer, byte_view
from .errors import (
    CapacityError,
    ClosedError,
    ConfigError,
    IntegrityError,
    InvalidArgument,
    NotFound,
    PegaflowError,
    PluginError,
    TransportError,
)
from .hookspecs import hookimpl
from .index import Index, IndexStats, Lease, Location, NodeInfo
from .keys import BlockKey
from .sizes import format_size, parse_size
from .tier import MemoryKind, SharedPool, StackContext, Tier, TierCapabilities, TierUsage
from .transport import Region, RemoteRegion, TransferOp, Transport

__version__ = "0.1.0"

__all__ = [
    "Availability", "Backend", "BlockKey", "Buffer", "CapacityError", "ClosedError", "ConfigError",
    "Index", "IndexStats", "IntegrityError", "InvalidArgument", "Lease", "Location", "MemoryKind",
    "NoOptions", "NodeInfo", "NotFound", "PegaflowError", "PluginError", "Region", "RemoteRegion", "SharedPool",
    "StackContext", "Tier", "TierCapabilities", "TierUsage", "TransferOp", "Transport", "TransportError", "__version__",
    "byte_view", "format_size", "hookimpl", "parse_size",
]
