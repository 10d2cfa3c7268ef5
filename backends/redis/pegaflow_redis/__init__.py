"""pegaflow-redis: the cluster index on Redis (``index: {kind: redis, url: ...}``).

Importing this package does not import redis-py; building a :class:`RedisIndex` does.
"""

from .index import NodeInfo, RedisIndex
from .options import RedisIndexOptions

__all__ = ["NodeInfo", "RedisIndex", "RedisIndexOptions"]
__version__ = "0.1.0"
