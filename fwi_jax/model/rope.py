"""Rotary position embedding (RoPE) of EVA02's attention: timm's ``RotaryEmbeddingCat`` table
and its rotation of q and k, on the patch tokens only (the class token, ahead of them, is left as
it is). Used by `eva02.Attention` and, inside its forward kernel, by attention "onednn"
(`fwi_jax.model.attention`), whose backward pass rotates here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_table(
    grid: tuple[int, int], head_dim: int, ref_feat_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """sin, cos (grid_h*grid_w, head_dim) float32 of timm's ``RotaryEmbeddingCat`` (in_pixels=False,
    temperature 1e4, 'index' grid rescaled onto ``ref_feat_shape``, interleaved layout)."""
    num_bands = head_dim // 4
    bands = 1.0 / (10000.0 ** (np.arange(num_bands, dtype=np.float32) / np.float32(num_bands)))
    axes = [
        np.arange(s, dtype=np.float32) / np.float32(s) * np.float32(r)
        for s, r in zip(grid, ref_feat_shape)
    ]
    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (H, W, 2)
    pos = (mesh[..., None] * bands).reshape(grid[0] * grid[1], 2 * num_bands)  # (N, 2*bands)
    pos = np.repeat(pos, 2, axis=-1)  # interleaved [f0, f0, f1, f1, ...]
    return np.sin(pos).astype(np.float32), np.cos(pos).astype(np.float32)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); x (B, N, H, D), sin/cos (N,
    D)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    sin, cos = sin[:, None, :], cos[:, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def rotate_tokens(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """``apply_rope`` on the last sin.shape[0] tokens of x (B, N, H, D); the first N - that
    (the class token) pass unrotated."""
    prefix = x.shape[1] - sin.shape[0]
    return jnp.concatenate([x[:, :prefix], apply_rope(x[:, prefix:], sin, cos)], axis=1)
