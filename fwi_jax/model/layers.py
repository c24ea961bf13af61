"""The model's dense layers, LayerNorms and SwiGLU gate, with backward passes written for XLA:CPU.

``linear`` builds an ``nnx.Linear`` and ``LayerNorm`` is an ``nnx.LayerNorm``: timm's parameter
names (``kernel``/``bias``, ``scale``/``bias``) and the same forward maths; only the gradients
are formed differently. Why by hand:

- Dense, y = x @ W with x (..., K), W (K, N): autodiff emits dW = x^T dy as a dot contracting
  both operands' leading (token) axis. XLA:CPU runs that on Eigen after transposing dy into an
  (N, tokens) copy (48 MB for tiny_s8's fc1), concurrently with the next layer's YNNPACK dot on
  the same two cores. ``dot_general`` in a CPU program instead transposes the narrower of x and
  dy itself (behind an optimization barrier, so XLA does not fold the transpose back into the
  dot) and contracts (narrow^T, wide), the form YNNPACK handles best. A model built for any
  other platform (``linear``'s ``platform``) uses the plain ``lax.dot_general``: GPU and TPU
  matmul libraries read transposed operands directly.
- LayerNorm: autodiff of flax's LayerNorm goes through its two statistics and their broadcasts,
  and XLA:CPU materialises the broadcast scale at full size for the YNNPACK fusions around it.
  ``layer_norm``'s VJP is the textbook one, dx = rstd (g - mean(g) - xhat mean(g xhat)) with
  g = dy * scale, from the saved per-row mean and 1/std.
- ``silu_mul`` (SwiGLU's silu(gate) * x): one sigmoid for both gradients.

What each of them buys on CPU is measured in docs/performance.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from fwi_jax.model import onednn
from fwi_jax.model.target import target_platform

# The CPU path's outputs are tagged with this name: the remat `dots` policy (fwi.REMAT_POLICIES)
# saves it, as it saves a plain dot's output (it cannot see the dot inside the custom VJP).
OUTPUT_NAME = "dense_out"


def _dense_dims(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> bool:
    """True for nnx.Linear's contraction: lhs (..., K) with rhs (K, N), no batch dimensions."""
    (lc, rc), (lb, rb) = dimension_numbers
    return (
        tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and rhs.ndim == 2 and not lb and not rb
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def dense(
    x: jax.Array, w: jax.Array, precision=None, preferred_element_type=None, impl: str = "xla"
) -> jax.Array:
    """x (..., K) @ w (K, N) -> (..., N), with the CPU-friendly backward pass described above;
    ``impl`` "onednn" runs the forward product on oneDNN (`fwi_jax.model.onednn`)."""
    if impl == "onednn":
        out = preferred_element_type or jnp.result_type(x, w)
        return onednn.matmul(x, w, out)
    return jnp.dot(x, w, precision=precision, preferred_element_type=preferred_element_type)


def _dense_fwd(x, w, precision, preferred_element_type, impl):
    return dense(x, w, precision, preferred_element_type, impl), (x, w)


def _dense_bwd(precision, preferred_element_type, impl, residuals, dy):
    x, w = residuals
    k, n = w.shape
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    barrier = jax.lax.optimization_barrier
    dx = jnp.dot(dy, w.T, precision=precision, preferred_element_type=jnp.float32).astype(x.dtype)
    if k <= n:  # transpose x (tokens x K): (K, tokens) @ (tokens, N)
        dw = jnp.dot(barrier(x2.T), dy2, precision=precision, preferred_element_type=jnp.float32)
    else:  # transpose dy: ((N, tokens) @ (tokens, K))^T, the (N, K) result is small (its barrier
        # keeps XLA from folding the final transpose into the dot as an Eigen (x^T dy) again)
        dw = barrier(
            jnp.dot(barrier(dy2.T), x2, precision=precision, preferred_element_type=jnp.float32)
        ).T
    return dx, dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def dot_general(
    lhs,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
    impl: str = "xla",
):
    """``lax.dot_general`` for nnx.Linear in a CPU program: its contraction goes through
    ``dense`` (with ``impl``, "xla" or "onednn")."""
    if out_sharding is None and _dense_dims(lhs, rhs, dimension_numbers):
        out = dense(lhs, rhs, precision, preferred_element_type, impl)
        return checkpoint_name(out, OUTPUT_NAME)
    return jax.lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32: x (..., D), scale and bias (D,) ->
    (..., D) in x's dtype. Variance as E[x^2] - E[x]^2, clipped at 0 (flax's fast variance)."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, -1, keepdims=True)
    var = jnp.maximum(jnp.mean(x32 * x32, -1, keepdims=True) - mean * mean, 0.0)
    rstd = jax.lax.rsqrt(var + eps)
    y = (x32 - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, residuals, dy):
    x, mean, rstd, scale, bias = residuals
    dy = dy.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g = dy * scale.astype(jnp.float32)
    dx = rstd * (g - jnp.mean(g, -1, keepdims=True) - xhat * jnp.mean(g * xhat, -1, keepdims=True))
    rows = tuple(range(x.ndim - 1))
    return (
        dx.astype(x.dtype),
        jnp.sum(dy * xhat, rows).astype(scale.dtype),
        jnp.sum(dy, rows).astype(bias.dtype),
    )


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@jax.custom_vjp
def silu_mul(gate: jax.Array, x: jax.Array) -> jax.Array:
    """SwiGLU's gating, silu(gate) * x, elementwise. Its VJP computes sigmoid(gate) once for
    both gradients (autodiff of silu then the product forms it in separate passes)."""
    return jax.nn.silu(gate) * x


def _silu_mul_fwd(gate, x):
    return silu_mul(gate, x), (gate, x)


def _silu_mul_bwd(residuals, dy):
    gate, x = residuals
    s = jax.nn.sigmoid(gate)
    return dy * x * s * (1 + gate * (1 - s)), dy * gate * s


silu_mul.defvjp(_silu_mul_fwd, _silu_mul_bwd)


class LayerNorm(nnx.LayerNorm):
    """nnx.LayerNorm (scale and bias, over the last axis) through ``layer_norm``; float32
    parameters, output in ``dtype``."""

    def __init__(self, dim: int, *, epsilon: float, dtype, rngs: nnx.Rngs):
        super().__init__(dim, epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array, *, mask=None) -> jax.Array:
        if mask is not None:
            raise ValueError("fwi_jax LayerNorm takes no mask")
        return layer_norm(x, self.scale[...], self.bias[...], self.epsilon).astype(
            self.dtype or x.dtype
        )


def linear(
    din: int,
    dout: int,
    *,
    rngs: nnx.Rngs,
    dtype,
    use_bias: bool = True,
    platform: str | None = None,
    dense: str = "xla",
    **kwargs,
) -> nnx.Linear:
    """nnx.Linear(din, dout) with float32 parameters and compute ``dtype``, for a program
    compiled for ``platform`` (None: this process's default backend): ``dot_general`` above on
    cpu, with the forward product on ``dense`` ("xla" or "onednn", `onednn.resolve`'s
    answer), ``lax.dot_general`` elsewhere."""
    if target_platform(platform) == "cpu":
        dot = functools.partial(dot_general, impl=dense)
    else:
        dot = jax.lax.dot_general
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        dot_general=dot,
        rngs=rngs,
        **kwargs,
    )
