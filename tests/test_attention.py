"""Attention implementations agree with jax.nn.dot_product_attention (forward and gradients).

Tolerances: every implementation computes the same float32 maths in a different summation order
(the blockwise one rescales partial sums by exp(m_old - m_new) per key block; query_blocks and
fused_cpu sum dK and dV over query blocks; fused_cpu's exp is a polynomial with relative error
< 2e-6). Each output or
gradient entry is a sum of <= N products of O(1) values, so the reordering error is a few float32
ulps times log2(N) -- about 1e-6 relative here. We allow atol = rtol = 2e-5 (float32 eps is 1.2e-7):
loose enough for reordering, 1,000x tighter than any real bug (a wrong scale, a missing
rescale, a padded key that leaks in, all move entries by >= 1e-2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwi_jax.model.attention import IMPLEMENTATIONS, attention, resolve_impl

ATOL = RTOL = 2e-5


def rope_2d(x: jax.Array, grid: tuple[int, int], n_prefix: int = 1) -> jax.Array:
    """A plain 2-D rotary embedding in the style of timm's EVA (interleaved pairs, half the pair
    frequencies for the row index, half for the column index); prefix (cls) tokens unrotated.

    x: (B, N, H, D) with N = n_prefix + grid[0] * grid[1], D divisible by 4.
    """
    d = x.shape[-1]
    rows, cols = jnp.meshgrid(jnp.arange(grid[0]), jnp.arange(grid[1]), indexing="ij")
    freqs = 1.0 / (10000.0 ** (jnp.arange(d // 4) / (d // 4)))
    # (P, D/2)
    angles = jnp.concatenate([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], axis=-1)
    angles = jnp.repeat(angles, 2, axis=-1)[:, None, :]  # (P, 1, D): same angle for each pair
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    prefix, patches = x[:, :n_prefix], x[:, n_prefix:]
    rotated_half = jnp.stack([-patches[..., 1::2], patches[..., ::2]], axis=-1).reshape(
        patches.shape
    )
    return jnp.concatenate([prefix, patches * cos + rotated_half * sin], axis=1)


def _qkv(shape, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    # scale 2 makes the softmax peaked enough that a wrong max/rescale shows up clearly
    return [(2.0 * jax.random.normal(key, shape)).astype(dtype) for key in keys]


def _reference(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


GRID = (14, 14)  # 196 patches + cls = 197 tokens, not a multiple of 64


def _check_with_rope(ours, seed=0, cotangent_seed=9, head_dim=16, batch=2, heads=3):
    """``ours`` (q, k, v) -> out against `_reference` with 2-D RoPE on q and k, N = 197 tokens:
    the forward and the gradients w.r.t. q, k, v of a random projection of the output."""
    shape = (batch, 1 + GRID[0] * GRID[1], heads, head_dim)
    q, k, v = _qkv(shape, seed=seed)
    w = jax.random.normal(jax.random.key(cotangent_seed), shape)  # random cotangent

    def loss(fn, q, k, v):
        return jnp.sum(fn(rope_2d(q, GRID), rope_2d(k, GRID), v) * w)

    out = jax.jit(ours)(rope_2d(q, GRID), rope_2d(k, GRID), v)
    ref = _reference(rope_2d(q, GRID), rope_2d(k, GRID), v)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=RTOL)

    grads = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2)))(q, k, v)
    ref_grads = jax.grad(lambda *a: loss(_reference, *a), argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert float(jnp.abs(r).max()) > 1e-2, f"d{name} trivially small: the test could not fail"
        np.testing.assert_allclose(g, r, atol=ATOL, rtol=RTOL, err_msg=f"d{name}")


@pytest.mark.parametrize(
    "impl,block",
    [
        ("blockwise", 64),
        ("blockwise", 50),
        ("blockwise", 512),
        ("query_blocks", 64),
        ("query_blocks", 50),
        ("query_blocks", 512),
        ("fused_cpu", 64),
        ("fused_cpu", 50),
        ("fused_cpu", 512),
    ],
)
def test_forward_and_gradients_match_with_rope(impl, block):
    _check_with_rope(lambda q, k, v: attention(q, k, v, impl=impl, block_size=block))


@pytest.mark.parametrize("head_dim,block", [(64, 128), (64, 7), (48, 64), (32, 197)])
def test_fused_cpu_head_dims_with_rope(head_dim, block):
    """The C++ kernel's other micro-tile widths (head_dim 64: 4 AVX-512 vectors a row; 48: 3;
    32: 2; 16 above: 1) and ragged query blocks (7 rows: the 6-row micro-tile's remainders)."""
    _check_with_rope(
        lambda q, k, v: attention(q, k, v, impl="fused_cpu", block_size=block), head_dim=head_dim
    )


@pytest.mark.parametrize("heads,block", [(3, 50), (1, 30)])
def test_fused_cpu_few_heads_split_query_blocks(heads, block):
    """Fewer batch x heads than twice the threads: each head's query blocks are cut into chunks
    (3 heads: 2 chunks of 2 of the 4 blocks; 1 head: 4 chunks of 2, 2, 2, 1 of the 7 blocks on 2
    threads) whose dK, dV partials are summed afterwards."""
    _check_with_rope(
        lambda q, k, v: attention(q, k, v, impl="fused_cpu", block_size=block), batch=1, heads=heads
    )


@pytest.mark.parametrize(
    "impl,block", [("blockwise", 512), ("query_blocks", 256), ("fused_cpu", 128)]
)
def test_full_token_count(impl, block):
    """The real token count (1,980 patches + cls = 1,981, a multiple of neither block), one head
    to keep it cheap: forward, and the gradients of a random projection of the output."""
    q, k, v = _qkv((1, 1981, 1, 64), seed=3)
    w = jax.random.normal(jax.random.key(4), q.shape)
    ours = lambda q, k, v: attention(q, k, v, impl=impl, block_size=block)
    np.testing.assert_allclose(jax.jit(ours)(q, k, v), _reference(q, k, v), atol=ATOL, rtol=RTOL)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    ref_grads = jax.grad(lambda *a: jnp.sum(_reference(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=ATOL, rtol=RTOL, err_msg=f"d{name}")


def _attention_float64(q, k, v, w):
    """Exact (float64, numpy) attention of float32 inputs: out and the gradients of sum(out * w)."""
    # (B, H, N, D)
    q, k, v, w = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v, w))
    scale = q.shape[-1] ** -0.5
    s = scale * q @ k.swapaxes(-1, -2)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = w @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    grads = (scale * ds @ k, scale * ds.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ w)
    return [x.transpose(0, 2, 1, 3) for x in (p @ v, *grads)]


@pytest.mark.parametrize("profile", ["rising", "negative"])
def test_fused_cpu_score_profiles(profile):
    """fused_cpu's forward raises a row's running maximum only when a later panel of 64 keys
    outscores it by more than 8, and rescales the row's earlier probabilities then; its backward
    walks the keys in chunks of 512. N = 600 tokens: two key chunks, the second ragged (88 keys),
    and 40 padding columns after the last key.

    rising: scaled scores grow with the key index by ~100 over the row (every panel raises the
    maximum: the rescale path on every row). negative: all scores near -500 (a padding column that
    leaked into the maximum, at 0, would underflow every probability).

    Tolerance: scores of magnitude 100-500 carry float32 rounding errors of ~|s| x 1e-7 whatever
    the order of summation, so both fused_cpu and XLA's float32 attention are compared with exact
    (float64) attention: fused_cpu's error may be at most 3x XLA's plus 2e-6 (measured: 1.2-1.7x).
    The bugs named above move entries by >= 1e-2."""
    n, d = 600, 64
    q, k, v = _qkv((2, n, 2, d), seed=5)
    q = q.at[..., 0].set(8.0)
    if profile == "rising":
        k = k.at[..., 0].set(jnp.linspace(0.0, 100.0, n)[None, :, None])  # scaled score ~ 8 k_0 / 8
    else:
        k = k.at[..., 0].set(-500.0)
    w = jax.random.normal(jax.random.key(6), q.shape)

    def out_and_grads(fn):
        out = jax.jit(fn)(q, k, v)
        return [out, *jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2)))(q, k, v)]

    exact = _attention_float64(q, k, v, w)
    ours = out_and_grads(lambda q, k, v: attention(q, k, v, impl="fused_cpu", block_size=64))
    xla = out_and_grads(_reference)
    for name, o, x, e in zip(["out", "dq", "dk", "dv"], ours, xla, exact):
        assert np.abs(e).max() > 1e-2, f"{name} trivially small: the test could not fail"
        err, err_xla = np.abs(np.asarray(o) - e).max(), np.abs(np.asarray(x) - e).max()
        assert err <= 3 * err_xla + 2e-6, (
            f"{name}: fused_cpu off by {err:.2e}, XLA's float32 by {err_xla:.2e}"
        )


@pytest.mark.parametrize("impl", ["blockwise", "query_blocks"])
def test_never_materialises_the_score_matrix(impl):
    n, block = 197, 64
    q, k, v = _qkv((1, n, 2, 16))
    grad = lambda impl: jax.grad(
        lambda q, k, v: attention(q, k, v, impl=impl, block_size=block).sum(), argnums=(0, 1, 2)
    )
    square = f"{n},{n}]"
    assert square in str(jax.make_jaxpr(grad("xla"))(q, k, v))  # the check can see an (N, N) array
    assert square not in str(jax.make_jaxpr(grad(impl))(q, k, v))


@pytest.mark.parametrize("impl", ["blockwise", "query_blocks", "fused_cpu", "onednn"])
def test_bfloat16_inputs_accumulate_in_float32(impl):
    """bfloat16 in, bfloat16 out; compared with float32 attention of the same (rounded) inputs.
    Tolerance: bfloat16 has an 8-bit significand (eps 2^-8 = 3.9e-3); the output is rounded once
    to bfloat16 and p is rounded to bfloat16 before p @ v, so errors stay within a few eps of the
    O(1) outputs -> atol = rtol = 2e-2. Accumulating the 197-term sums in bfloat16 instead would
    give errors of order sqrt(197) * eps ~ 5e-2 and more."""
    shape = (2, 197, 3, 16)
    q, k, v = _qkv(shape, dtype=jnp.bfloat16)
    out = jax.jit(lambda q, k, v: attention(q, k, v, impl=impl, block_size=64))(q, k, v)
    assert out.dtype == jnp.bfloat16
    ref = _reference(*(a.astype(jnp.float32) for a in (q, k, v)))
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=2e-2, rtol=2e-2)
    grads = jax.grad(
        lambda q: attention(q, k, v, impl=impl, block_size=64).astype(jnp.float32).sum()
    )(q)
    assert grads.dtype == jnp.bfloat16 and bool(jnp.isfinite(grads.astype(jnp.float32)).all())


def test_auto_rule_and_errors():
    assert set(IMPLEMENTATIONS) == {
        "xla",
        "cudnn",
        "blockwise",
        "query_blocks",
        "fused_cpu",
        "onednn",
        "auto",
    }
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        assert resolve_impl("auto") == "fused_cpu"  # this machine has a C++ compiler (CI too)
        q = jnp.zeros((1, 8, 1, 8))
        with pytest.raises(ValueError, match="cudnn"):
            attention(q, q, q, impl="cudnn")
        with pytest.raises(ValueError, match="head_dim a multiple of 16"):
            attention(q, q, q, impl="fused_cpu")
        # auto picks what runs: head_dim 8 goes to query_blocks
        np.testing.assert_allclose(attention(q + 1.0, q, q + 2.0, impl="auto"), q + 2.0)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        resolve_impl("flash")
    with pytest.raises(ValueError, match="one shape"):
        attention(
            jnp.zeros((1, 8, 1, 8)), jnp.zeros((1, 9, 1, 8)), jnp.zeros((1, 8, 1, 8)), impl="xla"
        )
    with pytest.raises(ValueError, match="unknown attention implementation 'einsum'"):
        resolve_impl("einsum")  # the maths of xla: not offered


def _forward_passes(jaxpr) -> int:
    """Attention forward passes in a jaxpr: scans whose body takes a row max (both tilings'
    forward scans do; their backward scans reuse the saved log-sum-exp and take none)."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            n += any(e.primitive.name == "reduce_max" for e in eqn.params["jaxpr"].jaxpr.eqns)
        for param in eqn.params.values():
            sub = getattr(param, "jaxpr", param)
            if hasattr(sub, "eqns"):
                n += _forward_passes(sub)
    return n


def _ffi_forward_calls(jaxpr) -> int:
    """fused_cpu forward kernel calls in a jaxpr, nested jaxprs included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "ffi_call" and "forward" in str(
            eqn.params.get("target_name", "")
        )
        for param in eqn.params.values():
            sub = getattr(param, "jaxpr", param)
            if hasattr(sub, "eqns"):
                n += _ffi_forward_calls(sub)
    return n


@pytest.mark.parametrize("impl", ["blockwise", "query_blocks", "fused_cpu"])
def test_remat_dots_keeps_attention_residuals(impl):
    """Under the model's "dots" remat policy the attention output and log-sum-exp are saved, so
    the backward pass runs no second attention forward; "full" recomputes it."""
    from fwi_jax.model.fwi import REMAT_POLICIES

    x = jax.random.normal(jax.random.key(0), (1, 197, 32))
    wq = jax.random.normal(jax.random.key(1), (32, 3 * 32)) * 0.1

    def block(x, wq):
        q, k, v = (t.reshape(1, 197, 2, 16) for t in jnp.split(x @ wq, 3, axis=-1))
        return jnp.sum(attention(q, k, v, impl=impl, block_size=64) ** 2)

    passes = {}
    for remat in ("none", "dots", "full"):
        fn = block if remat == "none" else jax.checkpoint(block, policy=REMAT_POLICIES[remat])
        count = _ffi_forward_calls if impl == "fused_cpu" else _forward_passes
        passes[remat] = count(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(x, wq).jaxpr)
    assert passes == {"none": 1, "dots": 1, "full": 2}, passes


@pytest.mark.parametrize("tokens", [301, 64])  # odd (as 1,981 is) and even
def test_even_length_padding_changes_neither_values_nor_gradients(tokens):
    """The padding that keeps cuDNN's backward pass off odd sequence lengths (EVA02: 1,981), run
    with XLA's implementation: the same output and the same gradients as the unpadded call."""
    from fwi_jax.model.attention import even_length_attention

    rng = np.random.default_rng(tokens)
    q, k, v = (jnp.asarray(rng.standard_normal((2, tokens, 3, 16)), jnp.float32) for _ in range(3))
    w = jnp.asarray(rng.standard_normal((2, tokens, 3, 16)), jnp.float32)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * w)

    plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
    padded = lambda q, k, v: even_length_attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-6)
    got = jax.grad(loss(padded), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    for g, h in zip(got, want):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)
    # vmapped over members, as the stacked ensemble runs it
    members = jnp.stack([q, 2 * q])
    np.testing.assert_allclose(
        jax.vmap(lambda m: padded(m, k, v))(members),
        jax.vmap(lambda m: plain(m, k, v))(members),
        rtol=1e-5,
        atol=1e-6,
    )
