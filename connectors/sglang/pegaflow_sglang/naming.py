"""Block keys of SGLang pages: which namespace and shard a page belongs to, and the bytes of its
key.

SGLang names a page by a chained SHA-256 hex digest of its token prefix and nothing else: no
model, no TP split, no layout. Those go into the pegaflow namespace here, so SGLang never reads a
block of another model, TP layout or byte format, and SGLang and vLLM (whose namespaces carry
their own engine tag) share a daemon safely. The namespace fingerprints the *stored bytes*, not
the name of SGLang's host layout: host layouts whose flat page holds the same bytes in the same
order (layer_first and page_first_direct, and the GPU KV of the radix-cache route) share blocks.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Sequence
from dataclasses import dataclass

from pegaflow_core.keys import MAX_HASH_BYTES
from pegaflow_core.layout import namespace_for

ENGINE = "sglang"
_HEX = frozenset(string.hexdigits)
_DIGEST_DOMAIN = b"pegaflow-sglang-page-key\x00"

# The order of one page's bytes in SGLang's flat page (``get_data_page(i, flat=True)``):
# layer-major = K[layer][token][...] then V (MLA: [layer][token][...]);
# token-major = K[token][layer][...] then V (MLA: [token][layer][...]).
PAGE_ORDER = {"layer_first": "layer-major", "page_first_direct": "layer-major", "page_first": "token-major"}


def page_hash(key: object) -> bytes:
    """The block hash of one SGLang page key. SGLang's keys are hex digests: stored as their
    bytes. Any other non-empty string is hashed (SHA-256, domain-separated) so it still fits a
    block key. Raises ValueError on anything else."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"expected a non-empty string page key, got {key!r:.80}")
    if len(key) % 2 == 0 and len(key) <= 2 * MAX_HASH_BYTES and _HEX.issuperset(key):
        return bytes.fromhex(key)
    return hashlib.sha256(_DIGEST_DOMAIN + key.encode("utf-8", "surrogatepass")).digest()


def valid_prefix(keys: Sequence[object]) -> tuple[list[bytes], int]:
    """Hashes of the leading run of valid keys, and the index of the first invalid one (or
    ``len(keys)``): prefix operations stop at the first bad key."""
    hashes: list[bytes] = []
    for key in keys:
        try:
            hashes.append(page_hash(key))
        except ValueError:
            break
    return hashes, len(hashes)


@dataclass(frozen=True)
class PageFormat:
    """What shapes the bytes of one stored page."""

    order: str  # "layer-major" or "token-major"
    dtype: str
    page_size: int  # tokens per page
    num_layers: int
    page_bytes: int
    mla: bool


@dataclass(frozen=True)
class Placement:
    """Where this engine rank sits: model and parallel layout."""

    model: str
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1

    def namespace(self, page: PageFormat) -> str:
        """Model + byte format + the splits that change which bytes a rank holds. MLA caches are
        identical on every TP rank, so the TP size stays out of their namespace."""
        return namespace_for(
            self.model, engine=ENGINE, order=page.order, dtype=page.dtype, page_size=page.page_size,
            num_layers=page.num_layers, page_bytes=page.page_bytes, mla=page.mla,
            tp_size=None if page.mla else self.tp_size, pp=f"{self.pp_rank}/{self.pp_size}", cp_size=self.cp_size,
        )

    def shard(self, mla: bool) -> int:
        """Key shard of this rank: one per TP rank (MHA) and per context-parallel rank; MLA pages
        are stored once for all TP ranks."""
        return self.cp_rank if mla else self.cp_rank * self.tp_size + self.tp_rank
