"""One attention function; the config picks its implementation.

Layout everywhere: q, k, v of shape (batch, tokens, heads, head_dim), the layout of
`jax.nn.dot_product_attention`. Output has the shape and dtype of q. Non-causal, no mask
(EVA02 attends over all patch tokens plus the cls token, N = 1,981 for 1,980 patches).

Implementations (``cfg.model.attention``):

- ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``; materialises the
  (N, N) scores of every head.
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused flash
  attention. NVIDIA GPUs of compute capability >= 8.0 only; anywhere else it raises, never
  falls back silently.
- ``"einsum"``: einsum - softmax - einsum. Same maths as "xla", measured faster on CPU
  (SPEC §7: 290 ms vs 470 ms for tiny's attention forward); see ``docs/performance.md``.
- ``"blockwise"``: flash-style attention in pure JAX with a custom VJP: an online softmax over
  key blocks of ``block_size`` tokens, the backward pass recomputes the scores block by block
  from the saved log-sum-exp. Peak memory per head is O(N * block_size), never O(N^2). For
  GPUs without cuDNN flash attention (V100) and for memory estimates.
- ``"auto"``: the rule of :func:`resolve_impl` -- cuDNN on NVIDIA GPUs that have it
  (compute capability >= 8.0), blockwise on older NVIDIA GPUs (V100: no cuDNN flash kernel, the
  (N, N) scores would dominate memory), blockwise on CPU too (fastest measured there, forward
  and backward: scripts/bench_attention.py, docs/performance.md), xla elsewhere (TPU, ROCm).

Matmuls accumulate in float32 whatever the input dtype (bfloat16 / float16 inputs keep their
dtype for the matmul operands, as flash attention does); the softmax runs in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "einsum", "blockwise", "auto")

_F32 = jnp.float32


def _cudnn_available(device: jax.Device) -> bool:
    """True for NVIDIA GPUs with cuDNN flash attention (compute capability >= 8.0)."""
    if device.platform != "gpu":
        return False
    capability = getattr(device, "compute_capability", None)
    if capability is None:  # ROCm and others report none: no cuDNN
        return False
    return float(capability) >= 8.0


def resolve_impl(impl: str, device: jax.Device | None = None) -> str:
    """Concrete implementation for `impl` on `device` (default: the first local device).

    "auto": cudnn on NVIDIA GPUs of compute capability >= 8.0; blockwise on older NVIDIA GPUs
    (V100, 7.0); blockwise on CPU (measured fastest there: its (N, block) score tiles stay in
    cache, where xla/einsum stream (N, N) arrays through memory); xla on any other platform.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    if impl != "auto":
        return impl
    device = device or jax.local_devices()[0]
    if device.platform == "cpu":
        return "blockwise"
    if device.platform == "gpu" and getattr(device, "compute_capability", None) is not None:
        return "cudnn" if _cudnn_available(device) else "blockwise"
    return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla", block_size: int = 512) -> jax.Array:
    """Softmax(q k^T / sqrt(d)) v, non-causal, no mask.

    q, k, v: (batch, tokens, heads, head_dim), same dtype. Returns (batch, tokens, heads, head_dim)
    in q's dtype. `block_size` is used by "blockwise" only (key block length, any positive int;
    the token count need not be a multiple of it).
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention expects q, k, v of one shape (batch, tokens, heads, head_dim); got {q.shape}, {k.shape}, {v.shape}")
    impl = resolve_impl(impl)
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    if impl == "cudnn":
        device = jax.local_devices()[0]
        if not _cudnn_available(device):
            raise ValueError(
                f"attention impl 'cudnn' needs an NVIDIA GPU of compute capability >= 8.0 with cuDNN; "
                f"this process runs on {device.platform} ({device.device_kind}). "
                "Use model.attention=auto, blockwise, einsum or xla."
            )
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if impl == "einsum":
        return _einsum_attention(q, k, v)
    if impl == "blockwise":
        if block_size < 1:
            raise ValueError(f"attention block_size must be a positive int, got {block_size}")
        return _blockwise_attention(q, k, v, int(block_size))
    raise AssertionError(impl)  # unreachable: resolve_impl validated it


def _einsum_attention(q, k, v):
    """Plain einsum-softmax-einsum; scores (B, H, N, N) in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=_F32) * scale
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=_F32)
    return out.astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Blockwise (flash-style) attention.
# Written by hand because neither jax nor flax ships a portable memory-efficient attention with
# a recomputing backward pass for CPU / pre-Ampere GPUs (jax's Pallas kernels are GPU/TPU only,
# cuDNN's needs compute capability >= 8.0).


def _key_blocks(k, v, block_size):
    """Pad keys/values to a multiple of block_size and split: (n_blocks, B, block, H, D) each,
    plus a validity mask (n_blocks, block)."""
    n = k.shape[1]
    n_blocks = -(-n // block_size)
    pad = n_blocks * block_size - n
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        k = jnp.pad(k, widths)
        v = jnp.pad(v, widths)
    split = lambda a: a.reshape(a.shape[0], n_blocks, block_size, *a.shape[2:]).swapaxes(0, 1)
    valid = (jnp.arange(n_blocks * block_size) < n).reshape(n_blocks, block_size)
    return split(k), split(v), valid


def _block_scores(q, k_block, valid, scale):
    """Scaled scores (B, H, Nq, block) in float32 with padded keys at -inf."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k_block, preferred_element_type=_F32) * scale
    return jnp.where(valid[None, None, None, :], s, -jnp.inf)


def _blockwise_forward(q, k, v, block_size):
    """Returns out (B, N, H, D) in q.dtype and the log-sum-exp (B, H, N) float32."""
    b, n, h, d = q.shape
    scale = 1.0 / math.sqrt(d)
    k_blocks, v_blocks, valid = _key_blocks(k, v, block_size)

    def step(carry, block):
        m, l, acc = carry  # running max (B,H,N), normaliser (B,H,N), numerator (B,H,N,D)
        k_b, v_b, valid_b = block
        s = _block_scores(q, k_b, valid_b, scale)
        m_new = jnp.maximum(m, s.max(axis=-1))  # finite: every block holds >= 1 real key
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(axis=-1)
        pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), v_b, preferred_element_type=_F32)
        acc = alpha[..., None] * acc + pv
        return (m_new, l, acc), None

    init = (
        jnp.full((b, h, n), -jnp.inf, _F32),
        jnp.zeros((b, h, n), _F32),
        jnp.zeros((b, h, n, d), _F32),
    )
    (m, l, acc), _ = jax.lax.scan(step, init, (k_blocks, v_blocks, valid))
    out = (acc / l[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)
    lse = m + jnp.log(l)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise_attention(q, k, v, block_size):
    return _blockwise_forward(q, k, v, block_size)[0]


def _blockwise_fwd(q, k, v, block_size):
    out, lse = _blockwise_forward(q, k, v, block_size)
    return out, (q, k, v, out, lse)


def _blockwise_bwd(block_size, residuals, d_out):
    """Recompute each key block's probabilities from the saved log-sum-exp (no (N, N) residual)."""
    q, k, v, out, lse = residuals
    n, d = q.shape[1], q.shape[3]
    scale = 1.0 / math.sqrt(d)
    k_blocks, v_blocks, valid = _key_blocks(k, v, block_size)
    # delta_i = sum_d dO_i * O_i  (B, H, N): the softmax-backward correction term.
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(_F32), out.astype(_F32))

    def step(dq, block):
        k_b, v_b, valid_b = block
        p = jnp.exp(_block_scores(q, k_b, valid_b, scale) - lse[..., None])  # (B,H,N,blk)
        dv_b = jnp.einsum("bhqk,bqhd->bkhd", p.astype(d_out.dtype), d_out, preferred_element_type=_F32)
        dp = jnp.einsum("bqhd,bkhd->bhqk", d_out, v_b, preferred_element_type=_F32)
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bhqk,bkhd->bqhd", ds.astype(k.dtype), k_b, preferred_element_type=_F32)
        dk_b = jnp.einsum("bhqk,bqhd->bkhd", ds.astype(q.dtype), q, preferred_element_type=_F32)
        return dq, (dk_b, dv_b)

    dq, (dk_blocks, dv_blocks) = jax.lax.scan(step, jnp.zeros(q.shape, _F32), (k_blocks, v_blocks, valid))
    unsplit = lambda a: a.swapaxes(0, 1).reshape(a.shape[1], -1, *a.shape[3:])[:, :n]
    return dq.astype(q.dtype), unsplit(dk_blocks).astype(k.dtype), unsplit(dv_blocks).astype(v.dtype)


_blockwise_attention.defvjp(_blockwise_fwd, _blockwise_bwd)
