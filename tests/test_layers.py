"""fwi_jax.model.layers: the CPU dense layer and the LayerNorm equal plain autodiff of their flax
counterparts, keep their parameters, and the dense layer's compiled backward pass has the layout
it exists for.

Tolerance: the same float32 products summed in another order (the transposed operand changes
the blocking of the token contraction, up to 400 terms here): a few ulps times log2(400) of the
sum's magnitude, about 1e-6 of the largest entry (an entry that nearly cancels has a large
relative error, so the bound is absolute at that scale). We allow 1e-5 of the largest entry,
far below what a wrong transpose or a missing term would move (O(1) of it).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fwi_jax.model.layers import LayerNorm, dense, linear, silu_mul

TOL = 1e-5


def close(got, want):
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * float(np.abs(want).max()))


@pytest.mark.parametrize("k, n", [(24, 80), (80, 24)])  # x transposed / dy transposed
def test_dense_matches_autodiff(k, n):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 133, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((3, 133, n)), jnp.float32)
    y, vjp = jax.vjp(lambda a, b: dense(a, b), x, w)
    y_ref, vjp_ref = jax.vjp(jnp.dot, x, w)
    close(y, y_ref)
    for got, want in zip(jax.jit(vjp)(dy), vjp_ref(dy)):
        assert got.shape == want.shape and got.dtype == want.dtype
        close(got, want)


def test_dense_bfloat16_keeps_dtypes():
    x = jnp.ones((2, 7, 16), jnp.bfloat16)
    w = jnp.full((16, 32), 0.5, jnp.bfloat16)
    y, vjp = jax.vjp(lambda a, b: dense(a, b), x, w)
    dx, dw = vjp(jnp.ones_like(y))
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3
    np.testing.assert_allclose(np.asarray(dw, np.float32), 14.0)  # 2 * 7 tokens of 1 * 1
    np.testing.assert_allclose(np.asarray(dx, np.float32), 16.0)  # 32 outputs of 0.5 * 1


def test_linear_has_nnx_linear_parameters_and_results():
    ours = linear(16, 40, dtype=jnp.float32, rngs=nnx.Rngs(0))
    plain = nnx.Linear(16, 40, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(ours, nnx.Param))) == jax.tree.map(
        jnp.shape, nnx.to_pure_dict(nnx.state(plain, nnx.Param))
    )
    nnx.update(ours, nnx.state(plain, nnx.Param))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 9, 16)), jnp.float32)

    def grads(model):
        return nnx.to_pure_dict(nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(model))

    for got, want in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(plain))):
        close(got, want)


@pytest.mark.parametrize("din, dout", [(32, 96), (96, 32)])  # x transposed / dy transposed
def test_backward_dots_contract_the_left_operands_last_axis(din, dout):
    """What the layer is for: in the compiled gradient every dot contracts lhs's last axis (the
    form XLA:CPU gives YNNPACK); plain autodiff emits the weight gradient contracting axis 0."""
    x = jnp.ones((6, 200, din), jnp.float32)
    model = linear(din, dout, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(p, x):
        return jnp.sum(nnx.merge(graphdef, p)(x) ** 2)

    def contractions(fn, p):
        hlo = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(p, x).compile().as_text()
        return re.findall(r"lhs_contracting_dims=\{(\d+)\}", hlo)

    ours = contractions(loss, params)
    assert ours and all(c == "1" for c in ours), ours
    plain = nnx.Linear(din, dout, rngs=nnx.Rngs(0))
    pgraph, pparams = nnx.split(plain)
    # the case we avoid
    assert "0" in contractions(lambda p, x: jnp.sum(nnx.merge(pgraph, p)(x) ** 2), pparams)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_flax(dtype):
    """Forward and gradients (input, scale, bias) of nnx.LayerNorm's autodiff, with non-trivial
    scale and bias and rows of nonzero mean (where a wrong mean term in dx would show)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 50, 48)) * 2.0 + 0.5, jnp.float32)
    dy = jnp.asarray(rng.standard_normal((3, 50, 48)), jnp.float32)
    ours = LayerNorm(48, epsilon=1e-6, dtype=dtype, rngs=nnx.Rngs(0))
    plain = nnx.LayerNorm(48, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    params = {
        "scale": jnp.asarray(1.0 + 0.3 * rng.standard_normal(48), jnp.float32),
        "bias": jnp.asarray(0.2 * rng.standard_normal(48), jnp.float32),
    }
    for m in (ours, plain):
        m.scale[...], m.bias[...] = params["scale"], params["bias"]

    def run(model):
        graphdef, p = nnx.split(model)
        y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), p, x)
        dp, dx = vjp(dy.astype(y.dtype))
        return y, dx, nnx.to_pure_dict(dp)

    (y, dx, dp), (y_ref, dx_ref, dp_ref) = run(ours), run(plain)
    assert y.dtype == y_ref.dtype == dtype and dx.dtype == jnp.float32
    if dtype == jnp.float32:
        check = close
    else:  # one bfloat16 rounding of y (and of dy's path through it): 2^-8 relative

        def check(got, want):
            np.testing.assert_allclose(
                np.asarray(got, np.float32),
                np.asarray(want, np.float32),
                rtol=1e-2,
                atol=1e-2 * float(np.abs(np.asarray(want, np.float32)).max()),
            )

    check(y, y_ref)
    check(dx, dx_ref)
    for name in ("scale", "bias"):
        check(dp[name], dp_ref[name])


def test_silu_mul_matches_autodiff():
    """SwiGLU's gate: values and both gradients of silu(gate) * x, over gates from -8 to 8 (both
    tails of the sigmoid)."""
    rng = np.random.default_rng(3)
    gate = jnp.asarray(np.linspace(-8, 8, 4 * 96).reshape(4, 96), jnp.float32)
    x = jnp.asarray(rng.standard_normal((4, 96)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((4, 96)), jnp.float32)
    y, vjp = jax.vjp(silu_mul, gate, x)
    y_ref, vjp_ref = jax.vjp(lambda g, h: jax.nn.silu(g) * h, gate, x)
    close(y, y_ref)
    for got, want in zip(jax.jit(vjp)(dy), vjp_ref(dy)):
        close(got, want)
