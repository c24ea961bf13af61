"""Dense layers whose backward pass suits XLA:CPU: ``linear`` builds an ``nnx.Linear`` (timm's
``kernel``/``bias`` names, unchanged parameters) that contracts through ``dot_general``.

Why by hand: for y = x @ W, with x (..., K) and W (K, N), autodiff emits dW = x^T dy as a dot that
contracts both operands' leading (token) axis. XLA:CPU runs that on Eigen after transposing dy
into an (N, tokens) copy (48 MB for tiny_s8's fc1), concurrently with the next layer's YNNPACK
dot on the same two cores. ``dot_general`` on a CPU process instead transposes the narrower of x
and dy itself (behind an optimization barrier, so XLA does not fold the transpose back into the
dot) and contracts (narrow^T, wide) in the form YNNPACK handles best. A tiny_s8 block without
attention, forward + backward on 2 cores: 223 -> 201 ms (PyTorch/oneDNN: 199 ms). On GPUs and
TPUs the plain ``lax.dot_general`` is used (their matmul libraries read transposed operands
directly).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

# The CPU path's outputs are tagged with this name: the remat `dots` policy (fwi.REMAT_POLICIES)
# saves it, as it saves a plain dot's output (it cannot see the dot inside the custom VJP).
OUTPUT_NAME = "dense_out"


def _dense_dims(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> bool:
    """True for nnx.Linear's contraction: lhs (..., K) with rhs (K, N), no batch dimensions."""
    (lc, rc), (lb, rb) = dimension_numbers
    return (tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and rhs.ndim == 2
            and not lb and not rb)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense(x: jax.Array, w: jax.Array, precision=None, preferred_element_type=None) -> jax.Array:
    """x (..., K) @ w (K, N) -> (..., N), with the CPU-friendly backward pass described above."""
    return jnp.dot(x, w, precision=precision, preferred_element_type=preferred_element_type)


def _dense_fwd(x, w, precision, preferred_element_type):
    return dense(x, w, precision, preferred_element_type), (x, w)


def _dense_bwd(precision, preferred_element_type, residuals, dy):
    x, w = residuals
    k, n = w.shape
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    barrier = jax.lax.optimization_barrier
    dx = jnp.dot(dy, w.T, precision=precision, preferred_element_type=jnp.float32).astype(x.dtype)
    if k <= n:  # transpose x (tokens x K): (K, tokens) @ (tokens, N)
        dw = jnp.dot(barrier(x2.T), dy2, precision=precision, preferred_element_type=jnp.float32)
    else:  # transpose dy: ((N, tokens) @ (tokens, K))^T, the (N, K) result is small
        dw = jnp.dot(barrier(dy2.T), x2, precision=precision, preferred_element_type=jnp.float32).T
    return dx, dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    """``lax.dot_general`` for nnx.Linear; on a CPU process its contraction goes through ``dense``."""
    if jax.default_backend() == "cpu" and out_sharding is None and _dense_dims(lhs, rhs, dimension_numbers):
        return checkpoint_name(dense(lhs, rhs, precision, preferred_element_type), OUTPUT_NAME)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, out_sharding=out_sharding)


def linear(din: int, dout: int, *, rngs: nnx.Rngs, dtype, use_bias: bool = True, **kwargs) -> nnx.Linear:
    """nnx.Linear(din, dout) with float32 parameters, compute ``dtype`` and ``dot_general`` above."""
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                      dot_general=dot_general, rngs=rngs, **kwargs)
