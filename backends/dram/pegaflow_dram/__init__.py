"""pegaflow DRAM tier: one shared-memory pool of slab-allocated block slots, pinned for the GPU
when one is present and placed on its NUMA node."""

from .options import DramOptions
from .pool import PoolStats, SlabAllocator, slot_size
from .tier import DramTier

__all__ = ["DramOptions", "DramTier", "PoolStats", "SlabAllocator", "slot_size"]
