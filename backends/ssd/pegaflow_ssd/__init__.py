"""pegaflow SSD tier: a crash-safe log of KV blocks in fixed-size segment files, written and read
with O_DIRECT through io_uring (or a thread pool), rebuilt from record headers at open."""

from .options import SsdOptions
from .tier import SsdTier

__all__ = ["SsdOptions", "SsdTier"]
