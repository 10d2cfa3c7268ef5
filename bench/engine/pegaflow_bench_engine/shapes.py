"""Model shapes of the reference engine: what decides its FLOPs and the bytes of its KV blocks.

Two attention kinds, as the connectors see them: ``gqa`` (Llama: per layer a K and a V cache,
vLLM's FlashAttention layout ``[2, num_blocks, block_size, kv_heads, head_dim]``) and ``mla``
(DeepSeek: per layer one latent cache ``[num_blocks, block_size, kv_lora_rank + rope_dim]``,
identical on every TP rank). Full shapes run on the GPU; CLI flags shrink them for CPU tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pegaflow_core.layout import namespace_for

_DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelShape:
    name: str
    attention: str  # "gqa" or "mla"
    layers: int
    hidden: int
    q_heads: int
    kv_heads: int  # gqa only (mla: 1 latent "head")
    head_dim: int  # gqa: q/k/v head dim; mla: the no-position part of q/k per head
    mlp: int
    vocab: int
    block_size: int = 16
    dtype: str = "bfloat16"
    kv_lora_rank: int = 0  # mla: width of the latent c_kv
    rope_dim: int = 0  # mla: width of the shared rotary key part
    v_head_dim: int = 0  # mla: value head dim
    rope_theta: float = 500_000.0

    def __post_init__(self) -> None:
        if self.attention not in ("gqa", "mla"):
            raise ValueError(f"attention must be 'gqa' or 'mla', got {self.attention!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for name in ("layers", "hidden", "q_heads", "head_dim", "mlp", "vocab", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.attention == "gqa":
            if self.kv_heads <= 0 or self.q_heads % self.kv_heads:
                raise ValueError(f"q_heads ({self.q_heads}) must be a multiple of kv_heads ({self.kv_heads})")
            if self.head_dim % 2:
                raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        elif min(self.kv_lora_rank, self.rope_dim, self.v_head_dim) <= 0 or self.rope_dim % 2:
            raise ValueError("an mla shape needs kv_lora_rank, an even rope_dim and v_head_dim above 0")

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype]

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    @property
    def page_bytes(self) -> int:
        """KV bytes of one block in one layer (K and V together for gqa)."""
        if self.attention == "gqa":
            return 2 * self.block_size * self.kv_heads * self.head_dim * self.itemsize
        return self.block_size * self.latent_dim * self.itemsize

    @property
    def block_bytes(self) -> int:
        """What the daemon stores per block: every layer's page."""
        return self.layers * self.page_bytes

    def namespace(self, model: str = "pegaflow-bench-engine", weights_seed: int = 0) -> str:
        """Equal shapes and weights share blocks; anything else must not (the KV bytes differ)."""
        return namespace_for(f"{model}/{self.name}", seed=weights_seed, **dataclasses.asdict(self))

    def scaled(self, **overrides: object) -> ModelShape:
        """This shape with some fields replaced (CLI flags); None values are ignored."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self


LLAMA_3_1_8B = ModelShape(
    name="llama-3.1-8b", attention="gqa", layers=32, hidden=4096, q_heads=32, kv_heads=8, head_dim=128,
    mlp=14336, vocab=128_256,
)

# DeepSeek-V2-Lite's attention (MLA: 16 heads, latent 512 + rope 64, nope 128, v 128) over 27 layers,
# with a dense MLP in place of its experts: the KV cache is exactly DeepSeek's, the compute a dense
# stand-in.
DEEPSEEK_MLA = ModelShape(
    name="deepseek-v2-lite-mla", attention="mla", layers=27, hidden=2048, q_heads=16, kv_heads=1, head_dim=128,
    mlp=10_944, vocab=102_400, kv_lora_rank=512, rope_dim=64, v_head_dim=128, rope_theta=10_000.0,
)

PRESETS = {"llama": LLAMA_3_1_8B, "mla": DEEPSEEK_MLA}


def tiny(shape: ModelShape) -> ModelShape:
    """CPU-test size of a preset: same structure, a few MB of weights, float32."""
    if shape.attention == "gqa":
        return shape.scaled(layers=2, hidden=128, q_heads=4, kv_heads=2, head_dim=32, mlp=256, vocab=512, dtype="float32")
    return shape.scaled(layers=2, hidden=128, q_heads=4, head_dim=32, mlp=256, vocab=512, kv_lora_rank=64,
                        rope_dim=16, v_head_dim=32, dtype="float32")
