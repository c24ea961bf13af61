"""One attention function; the config picks its implementation.

Layout everywhere: q, k, v of shape (batch, tokens, heads, head_dim), the layout of
`jax.nn.dot_product_attention`. Output has the shape of q.
"""

from __future__ import annotations

import jax

IMPLEMENTATIONS = ("xla",)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla", block_size: int = 512) -> jax.Array:
    """Softmax(q k^T / sqrt(d)) v, non-causal, no mask."""
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
