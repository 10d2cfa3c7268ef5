"""The reference decoder: random weights, the FLOPs and KV bytes of a real model, layer by layer.

Llama (gqa): RMSNorm, RoPE, grouped-query attention, SwiGLU. DeepSeek (mla): the latent cache
(c_kv after its norm, then the rotary key) is what is cached; prefill expands it to per-head keys
and values, as vLLM's MLA prefill path does. Attention is ``scaled_dot_product_attention`` over
the request's tokens gathered from the paged cache, causal aligned to the bottom right, so a
suffix attends to its cached prefix (flash attention on the GPU).

Weights come from a seeded generator on the device (no downloads). ``tied`` reuses one layer's
weights for every layer: the same FLOPs with 1/layers of the memory, so several engine processes
fit on one GPU. TP (mla) is simulated: each rank holds ``1/tp`` of the heads and MLP columns with
weights equal on every rank, and multiplies its partial output by ``tp`` in place of the
all-reduce, so every rank computes the same hidden states and the same latent cache (as real TP
ranks do) at one rank's cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .kv_cache import TORCH_DTYPES, PagedKVCache
from .shapes import ModelShape

EPS = 1e-5


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    wq: torch.Tensor  # gqa: q, k and v stacked; mla: q (nope + rope per local head)
    wo: torch.Tensor
    mlp_norm: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    wkv_a: torch.Tensor | None = None  # mla: hidden -> latent + rotary key
    kv_norm: torch.Tensor | None = None
    wkv_b: torch.Tensor | None = None  # mla: latent -> per-head key (nope) and value


class Decoder:
    def __init__(self, shape: ModelShape, device: torch.device, seed: int = 0, tied: bool = False,
                 tp_size: int = 1) -> None:
        if shape.attention == "mla" and (shape.q_heads % tp_size or shape.mlp % tp_size):
            raise ValueError(f"tp={tp_size} must divide q_heads ({shape.q_heads}) and mlp ({shape.mlp})")
        if shape.attention == "gqa" and tp_size != 1:
            raise ValueError("TP ranks are simulated for the mla shape only")
        self.shape = shape
        self.device = device
        self.dtype = TORCH_DTYPES[shape.dtype]
        self.tp_size = tp_size
        self.heads = shape.q_heads // tp_size
        self._gen = torch.Generator(device=device).manual_seed(seed)
        self.embedding = self._rand(shape.vocab, shape.hidden, scale=1.0)
        first = self._layer()
        self.layers = [first] + [first if tied else self._layer() for _ in range(shape.layers - 1)]
        self.final_norm = torch.ones(shape.hidden, device=device, dtype=self.dtype)
        self.lm_head = self._rand(shape.vocab, shape.hidden)
        rope = shape.head_dim if shape.attention == "gqa" else shape.rope_dim
        self._rope_of: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.inv_freq = shape.rope_theta ** (-torch.arange(0, rope, 2, device=device, dtype=torch.float32) / rope)

    # -- weights -----------------------------------------------------------------------------------
    def _rand(self, *dims: int, scale: float | None = None) -> torch.Tensor:
        t = torch.randn(*dims, generator=self._gen, device=self.device, dtype=self.dtype)
        return t.mul_(scale if scale is not None else dims[-1] ** -0.5)

    def _layer(self) -> LayerWeights:
        s, h = self.shape, self.shape.hidden
        ones = torch.ones(h, device=self.device, dtype=self.dtype)
        mlp = s.mlp // self.tp_size
        if s.attention == "gqa":
            return LayerWeights(attn_norm=ones, wq=self._rand((s.q_heads + 2 * s.kv_heads) * s.head_dim, h),
                                wo=self._rand(h, s.q_heads * s.head_dim), mlp_norm=ones.clone(),
                                w_gate_up=self._rand(2 * mlp, h), w_down=self._rand(h, mlp))
        return LayerWeights(
            attn_norm=ones, wq=self._rand(self.heads * (s.head_dim + s.rope_dim), h), wo=self._rand(h, self.heads * s.v_head_dim),
            mlp_norm=ones.clone(), w_gate_up=self._rand(2 * mlp, h), w_down=self._rand(h, mlp),
            wkv_a=self._rand(s.latent_dim, h), kv_norm=torch.ones(s.kv_lora_rank, device=self.device, dtype=self.dtype),
            wkv_b=self._rand(self.heads * (s.head_dim + s.v_head_dim), s.kv_lora_rank),
        )

    # -- forward -----------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding[tokens]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return _rms_norm(hidden, self.final_norm) @ self.lm_head.T

    def layer(self, index: int, h: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache,
              block_table: torch.Tensor, slots: torch.Tensor, total: int) -> torch.Tensor:
        """One layer over the new tokens ``h`` (at ``positions``): writes their KV into the cache at
        ``slots`` and attends over the request's first ``total`` tokens in the cache."""
        w = self.layers[index]
        x = _rms_norm(h, w.attn_norm)
        if self.shape.attention == "gqa":
            attn = self._gqa(index, w, x, positions, cache, block_table, slots, total)
        else:
            attn = self._mla(index, w, x, positions, cache, block_table, slots, total)
        h = h + attn
        x = _rms_norm(h, w.mlp_norm)
        gate, up = (x @ w.w_gate_up.T).chunk(2, dim=-1)
        return h + self._all_reduce((F.silu(gate) * up) @ w.w_down.T)

    def _gqa(self, index: int, w: LayerWeights, x: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache,
             block_table: torch.Tensor, slots: torch.Tensor, total: int) -> torch.Tensor:
        s, n = self.shape, x.shape[0]
        q, k, v = (x @ w.wq.T).split([s.q_heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
        cos, sin = self._rope(positions)
        # q and k rotated in one pass (one set of elementwise kernels instead of two).
        qk = _rotate(torch.cat([q.view(n, s.q_heads, s.head_dim), k.view(n, s.kv_heads, s.head_dim)], dim=1), cos, sin)
        q, k = qk[:, : s.q_heads], qk[:, s.q_heads :]
        cache.write(index, slots, k, v.view(n, s.kv_heads, s.head_dim))
        keys, values = cache.gather(index, block_table, total)
        # Grouped-query attention in the kernel (enable_gqa): no copy of K/V per query head.
        out = _causal_attention(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1))
        return out.transpose(0, 1).reshape(n, -1) @ w.wo.T

    def _mla(self, index: int, w: LayerWeights, x: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache,
             block_table: torch.Tensor, slots: torch.Tensor, total: int) -> torch.Tensor:
        s, n, heads = self.shape, x.shape[0], self.heads
        cos, sin = self._rope(positions)
        q = (x @ w.wq.T).view(n, heads, s.head_dim + s.rope_dim)
        q = torch.cat([q[..., : s.head_dim], _rotate(q[..., s.head_dim :], cos, sin)], dim=-1)
        kv_a = x @ w.wkv_a.T
        latent = torch.cat([_rms_norm(kv_a[:, : s.kv_lora_rank], w.kv_norm),
                            _rotate(kv_a[:, None, s.kv_lora_rank :], cos, sin)[:, 0]], dim=-1)
        cache.write(index, slots, latent)
        cached = cache.gather(index, block_table, total)
        kv = (cached[:, : s.kv_lora_rank] @ w.wkv_b.T).view(total, heads, s.head_dim + s.v_head_dim)
        k_rope = cached[:, None, s.kv_lora_rank :].expand(total, heads, s.rope_dim)
        keys = torch.cat([kv[..., : s.head_dim], k_rope], dim=-1).transpose(0, 1)
        # Pad V to the q/k head dim so flash attention takes it; the padding is sliced off.
        values = F.pad(kv[..., s.head_dim :], (0, s.head_dim + s.rope_dim - s.v_head_dim)).transpose(0, 1)
        out = _causal_attention(q.transpose(0, 1), keys, values)[..., : s.v_head_dim]
        return self._all_reduce(out.transpose(0, 1).reshape(n, -1) @ w.wo.T)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of ``positions``; every layer of a forward passes the same tensor, so they
        are computed once per forward (the engine's per-layer work is kernel launches, not FLOPs,
        when it computes a short suffix)."""
        cached = self._rope_of
        if cached is not None and cached[0] is positions:
            return cached[1], cached[2]
        cos, sin = self.rope_values(positions)
        self.use_rope(positions, cos, sin)
        return cos, sin

    def rope_values(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of ``positions``, [tokens, 1, rotary dim / 2] in float32."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return freqs.cos()[:, None, :], freqs.sin()[:, None, :]

    def use_rope(self, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Layers given ``positions`` (this very tensor) read ``cos`` and ``sin``: a captured
        graph's static buffers, refilled before each replay."""
        self._rope_of = (positions, cos, sin)

    def _all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Stands in for TP's all-reduce: ranks hold equal weights, so the sum is tp x a rank's part."""
        return partial if self.tp_size == 1 else partial * self.tp_size


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x32 = x.to(torch.float32)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of ``x`` [tokens, heads, dim]."""
    half = x.shape[-1] // 2
    x32 = x.to(torch.float32)
    a, b = x32[..., :half], x32[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [heads, new, d] attends to k/v [kv_heads, total, d] (kv_heads divides heads); the new
    tokens are the last ones."""
    new, total = q.shape[1], k.shape[1]
    gqa = k.shape[0] != q.shape[0]
    if new == total:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=gqa)[0]
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=causal_lower_right(new, total),
                                          enable_gqa=gqa)[0]
