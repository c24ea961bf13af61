"""EVA02 building blocks with timm's semantics and parameter names (timm ``models/eva.py``).

Tokens are (batch, tokens, dim). Parameters are float32; ``dtype`` is the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fwi_jax.model.attention import attention
from fwi_jax.model.layers import LayerNorm, linear, silu_mul
from fwi_jax.model.rope import rope_table

__all__ = ["SIZES", "Attention", "Block", "EvaSize", "SwiGLU", "rope_table"]


@dataclasses.dataclass(frozen=True)
class EvaSize:
    dim: int
    depth: int
    heads: int
    qkv_fused: bool  # one `qkv` matrix + q_bias/v_bias (tiny, small) or q/k/v_proj (base, large)
    scale_mlp: bool  # SwiGLU with split fc1_g/fc1_x and a LayerNorm before fc2 (base, large)


# timm: eva02_{tiny,small}_patch14_224 and eva02_{base,large}_patch14_448
SIZES = {
    "tiny": EvaSize(192, 12, 3, qkv_fused=True, scale_mlp=False),
    "small": EvaSize(384, 12, 6, qkv_fused=True, scale_mlp=False),
    "base": EvaSize(768, 12, 12, qkv_fused=False, scale_mlp=True),
    "large": EvaSize(1024, 24, 16, qkv_fused=False, scale_mlp=True),
}
LN_EPS = 1e-6


def _linear(din, dout, *, rngs, dtype, platform, dense, use_bias=True):
    return linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=dtype,
        rngs=rngs,
        platform=platform,
        dense=dense,
        kernel_init=nnx.initializers.truncated_normal(0.02),
    )


def _layer_norm(dim, *, rngs, dtype):
    return LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with q and v bias (no k bias) and RoPE on the non-cls tokens.
    ``impl``: the attention implementation (fwi_jax.model.attention); ``platform``: the one the
    program is compiled for; ``dense``: the dense layers' (fwi_jax.model.onednn)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        qkv_fused: bool,
        *,
        impl: str,
        block_size: int,
        dtype,
        platform: str,
        dense: str = "xla",
        rngs: nnx.Rngs,
    ):
        self.heads, self.impl, self.block_size, self.dtype = heads, impl, block_size, dtype
        self.platform = platform
        self.qkv_fused = qkv_fused
        lin = functools.partial(_linear, rngs=rngs, dtype=dtype, platform=platform, dense=dense)
        if qkv_fused:
            self.qkv = lin(dim, 3 * dim, use_bias=False)
            self.q_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
            self.v_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        else:
            self.q_proj = lin(dim, dim)
            self.k_proj = lin(dim, dim, use_bias=False)
            self.v_proj = lin(dim, dim)
        self.proj = lin(dim, dim)

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
        b, n, d = x.shape
        if self.qkv_fused:
            zeros = jnp.zeros_like(self.q_bias[...])
            bias = jnp.concatenate([self.q_bias[...], zeros, self.v_bias[...]]).astype(self.dtype)
            q, k, v = jnp.split(self.qkv(x) + bias, 3, axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads) for t in (q, k, v))
        # RoPE on q and k's patch tokens (sin, cos: one row per patch token) inside `attention`
        out = attention(
            q,
            k,
            v,
            impl=self.impl,
            block_size=self.block_size,
            platform=self.platform,
            rope=(sin, cos),
        )
        return self.proj(out.reshape(b, n, d))


class SwiGLU(nnx.Module):
    """SwiGLU MLP, hidden = int(dim * 4 * 2/3). Packed (timm GluMlp: fc1 -> [gate | x]) or split
    (timm SwiGLU: fc1_g, fc1_x, then LayerNorm ``norm`` before fc2 when ``scale_mlp``)."""

    def __init__(
        self, dim: int, scale_mlp: bool, *, dtype, platform: str, dense: str = "xla", rngs: nnx.Rngs
    ):
        hidden = int(dim * 4 * 2 / 3)
        self.scale_mlp = scale_mlp
        lin = functools.partial(_linear, rngs=rngs, dtype=dtype, platform=platform, dense=dense)
        if scale_mlp:
            self.fc1_g = lin(dim, hidden)
            self.fc1_x = lin(dim, hidden)
            self.norm = _layer_norm(hidden, rngs=rngs, dtype=dtype)
        else:
            self.fc1 = lin(dim, 2 * hidden)
        self.fc2 = lin(hidden, dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.scale_mlp:
            h = self.norm(silu_mul(self.fc1_g(x), self.fc1_x(x)))
        else:
            h = silu_mul(*jnp.split(self.fc1(x), 2, axis=-1))
        return self.fc2(h)


class Block(nnx.Module):
    """Pre-norm EVA02 block: x + attn(norm1(x)); x + mlp(norm2(x)). No layer scale."""

    def __init__(
        self,
        size: EvaSize,
        *,
        impl: str,
        block_size: int,
        dtype,
        platform: str,
        dense: str = "xla",
        rngs: nnx.Rngs,
    ):
        self.norm1 = _layer_norm(size.dim, rngs=rngs, dtype=dtype)
        self.attn = Attention(
            size.dim,
            size.heads,
            size.qkv_fused,
            impl=impl,
            block_size=block_size,
            dtype=dtype,
            platform=platform,
            dense=dense,
            rngs=rngs,
        )
        self.norm2 = _layer_norm(size.dim, rngs=rngs, dtype=dtype)
        self.mlp = SwiGLU(
            size.dim, size.scale_mlp, dtype=dtype, platform=platform, dense=dense, rngs=rngs
        )

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), sin, cos)
        return x + self.mlp(self.norm2(x))
