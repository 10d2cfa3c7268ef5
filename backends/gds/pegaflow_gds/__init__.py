"""pegaflow GPUDirect Storage tier: the ssd tier's crash-safe segment log, with blocks read
straight into (and written from) GPU memory by cuFile through kvikio."""

from .options import GdsOptions
from .tier import GdsTier

__all__ = ["GdsOptions", "GdsTier"]
