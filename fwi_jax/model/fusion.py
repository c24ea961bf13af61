"""Channel fusion by attention across the shot channels of each token (the first place's models).

Tokens in are (B, C, N, D): C channels (shots), N tokens (cls included), width D; out (B, N, D).
Parameter names follow PyTorch's ``nn.MultiheadAttention`` (``in_proj``: q, k, v stacked,
``out_proj``) so that a state_dict converts key by key (`fwi_jax.convert`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fwi_jax.model.layers import LayerNorm, linear


class MultiheadAttention(nnx.Module):
    """PyTorch's ``nn.MultiheadAttention`` (batch first, no dropout, no masks): q, k, v from one
    ``in_proj`` (D -> 3D, q rows first), softmax(q k^T / sqrt(D/H)) v per head in float32,
    ``out_proj``. Sequences here are a few channels long, so plain einsums serve."""

    def __init__(self, dim: int, heads: int, *, dtype, platform: str, rngs: nnx.Rngs):
        self.heads, self.dtype = heads, dtype
        self.in_proj = linear(dim, 3 * dim, dtype=dtype, rngs=rngs, platform=platform)
        self.out_proj = linear(dim, dim, dtype=dtype, rngs=rngs, platform=platform)

    def __call__(self, query: jax.Array, kv: jax.Array) -> jax.Array:
        """query (S, Lq, D), kv (S, Lk, D) -> (S, Lq, D)."""
        d = query.shape[-1]
        w = self.in_proj.kernel[...].astype(self.dtype)
        b = self.in_proj.bias[...].astype(self.dtype)
        q = query.astype(self.dtype) @ w[:, :d] + b[:d]
        k = kv.astype(self.dtype) @ w[:, d : 2 * d] + b[d : 2 * d]
        v = kv.astype(self.dtype) @ w[:, 2 * d :] + b[2 * d :]
        h = self.heads
        split = lambda t: t.reshape(*t.shape[:-1], h, d // h)  # (S, L, H, hd)
        q, k, v = split(q), split(k), split(v)
        logits = jnp.einsum("sqhd,skhd->shqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits / jnp.sqrt(jnp.float32(d // h)), axis=-1)
        out = jnp.einsum("shqk,skhd->sqhd", probs.astype(self.dtype), v)
        return self.out_proj(out.reshape(*out.shape[:-2], d))


class ChannelFusionSingle(nnx.Module):
    """Pre-norm self-attention across channels per token with a residual, then the channel mean
    (``mha_single``); LayerNorm eps 1e-6."""

    def __init__(
        self, dim: int, channels: int, heads: int, *, dtype, platform: str, rngs: nnx.Rngs
    ):
        self.mha = MultiheadAttention(dim, heads, dtype=dtype, platform=platform, rngs=rngs)
        self.norm = LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, c, n, d = x.shape
        s = x.transpose(0, 2, 1, 3).reshape(b * n, c, d)  # one sequence of C per token
        h = self.norm(s)
        s = s + self.mha(h, h)
        return s.mean(axis=1).reshape(b, n, d)


class ChannelFusionDual(nnx.Module):
    """A learned channel position embedding, pre-norm cross-channel self-attention with a
    residual, then attention from one learned query over the channels, then LayerNorm
    (``mha_dual``); LayerNorm eps 1e-5 (PyTorch's default, as the first place leaves it)."""

    def __init__(
        self,
        dim: int,
        channels: int,
        heads: int,
        query_heads: int,
        *,
        dtype,
        platform: str,
        rngs: nnx.Rngs,
    ):
        self.channel_pos = nnx.Param(jax.random.normal(rngs.params(), (1, channels, dim)))
        self.cross_channel_mha = MultiheadAttention(
            dim, heads, dtype=dtype, platform=platform, rngs=rngs
        )
        self.norm1 = LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.fusion_query = nnx.Param(jax.random.normal(rngs.params(), (1, 1, dim)))
        self.fusion_mha = MultiheadAttention(
            dim, query_heads, dtype=dtype, platform=platform, rngs=rngs
        )
        self.norm2 = LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, c, n, d = x.shape
        s = x.transpose(0, 2, 1, 3).reshape(b * n, c, d)
        s = s + self.channel_pos[...].astype(s.dtype)
        h = self.norm1(s)
        s = s + self.cross_channel_mha(h, h)
        query = jnp.broadcast_to(self.fusion_query[...].astype(s.dtype), (b * n, 1, d))
        fused = self.fusion_mha(query, s)[:, 0]  # (B*N, D)
        return self.norm2(fused.reshape(b, n, d))
