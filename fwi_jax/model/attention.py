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
- ``"query_blocks"``: the CPU layout of the same idea, also with a custom VJP: one head at a
  time, each sequential step takes ``block_size`` queries against all N keys, so every row's
  softmax is exact in one pass (no online rescaling, no running accumulator); the backward
  recomputes each probability tile, transposed to (N, block), from the saved log-sum-exp and
  accumulates dK, dV. Peak memory O(block_size * N), never O(N^2). Its 2-D matmuls, single pass
  and YNNPACK-friendly backward beat the key-block scan on CPU (fwd+bwd of tiny's attention
  0.37-0.41 vs 0.48-0.49 s; a tiny_s8 train step 5.64 vs 6.55 s, docs/performance.md); a
  sequential loop over heads would starve a GPU, so ``auto`` never picks it there.
- ``"fused_cpu"``: a C++ kernel for XLA:CPU through the XLA FFI (`fused_attention.py`,
  `csrc/attention_cpu.cc`): the query-block layout again, but each score tile goes from its
  matmul through the softmax into the next matmul while it is in L2, with register-blocked
  micro-kernels that read it in place; XLA:CPU cannot fuse that from JAX code. Float32 inside
  (other dtypes are cast), head_dim a multiple of 16, built on first use with the system C++
  compiler (cached). The fastest on CPU (tiny's attention forward + backward 0.27 s against
  query_blocks' 0.40 s and PyTorch's fused 0.26 s; docs/performance.md).
- ``"auto"``: the rule of :func:`resolve_impl` -- cuDNN on NVIDIA GPUs that have it
  (compute capability >= 8.0), blockwise on older NVIDIA GPUs (V100: no cuDNN flash kernel, the
  (N, N) scores would dominate memory), fused_cpu on CPU where its kernel builds (else
  query_blocks, said on stderr), xla elsewhere (TPU, ROCm).

Matmuls accumulate in float32 whatever the input dtype (bfloat16 / float16 inputs keep their
dtype for the matmul operands, as flash attention does); the softmax runs in float32.
"""

from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

IMPLEMENTATIONS = ("xla", "cudnn", "einsum", "blockwise", "query_blocks", "fused_cpu", "auto")
# block_size=None means: blockwise's key block, query_blocks' and fused_cpu's query block (measured
# on CPU, docs/performance.md: fused_cpu's forward tile of 64 rows x N keys, 0.5 MB, stays in a
# 2 MB L2 beside K^T and V). fused_cpu's backward pass, which walks the keys 256 at a time, runs
# best on blocks of 256 queries: its default block, unless block_size sets both passes'.
DEFAULT_BLOCKS = {"blockwise": 256, "query_blocks": 256, "fused_cpu": 64}
FUSED_CPU_BACKWARD_BLOCK = 256

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
    (V100, 7.0); fused_cpu on CPU where its kernel builds, else query_blocks (said once on
    stderr); xla on any other platform.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    if impl != "auto":
        return impl
    device = device or jax.local_devices()[0]
    if device.platform == "cpu":
        return _cpu_auto()
    if device.platform == "gpu" and getattr(device, "compute_capability", None) is not None:
        return "cudnn" if _cudnn_available(device) else "blockwise"
    return "xla"


@functools.cache
def _cpu_auto() -> str:
    """fused_cpu where its kernel builds (Linux with a C++ compiler), else query_blocks, said
    once on stderr (never a silent fallback)."""
    from fwi_jax.model.fused_attention import KernelBuildError, load_kernel

    try:
        load_kernel()
    except KernelBuildError as err:
        print(f"fwi_jax: attention auto -> query_blocks on CPU (slower) because the fused_cpu kernel is unavailable: {err}",
              file=sys.stderr, flush=True)
        return "query_blocks"
    return "fused_cpu"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla", block_size: int | None = None,
              heads_per_step: int | None = None) -> jax.Array:
    """Softmax(q k^T / sqrt(d)) v, non-causal, no mask.

    q, k, v: (batch, tokens, heads, head_dim), same dtype. Returns (batch, tokens, heads, head_dim)
    in q's dtype. `block_size` is the key block of "blockwise" and the query block of
    "query_blocks" and "fused_cpu" (any positive int; the token count need not be a multiple of
    it; None: `DEFAULT_BLOCKS`, and `FUSED_CPU_BACKWARD_BLOCK` for fused_cpu's backward pass);
    `heads_per_step` ("blockwise" only) is how many of the batch x heads attention heads one
    sequential step processes (None: `auto_heads_per_step`).
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention expects q, k, v of one shape (batch, tokens, heads, head_dim); got {q.shape}, {k.shape}, {v.shape}")
    requested, impl = impl, resolve_impl(impl)
    if impl == "fused_cpu" and requested == "auto":
        from fwi_jax.model.fused_attention import unsupported

        if unsupported(q.shape):  # auto picks what runs; asked for by name, fused_attention raises
            impl = "query_blocks"
    block_given = block_size is not None  # fused_cpu: then it is both passes' block
    if block_size is None:
        block_size = DEFAULT_BLOCKS.get(impl, 0)
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
    if impl in DEFAULT_BLOCKS and block_size < 1:
        raise ValueError(f"attention block_size must be a positive int, got {block_size}")
    if impl == "query_blocks":
        return _tiled_attention(q, k, v, "queries", int(block_size), 1)
    if impl == "fused_cpu":
        from fwi_jax.model.fused_attention import fused_attention

        return fused_attention(q, k, v, int(block_size), None if block_given else FUSED_CPU_BACKWARD_BLOCK)
    if impl == "blockwise":
        b, n, h, _ = q.shape
        if heads_per_step is None:
            heads_per_step = auto_heads_per_step(b * h, n, int(block_size))
        if heads_per_step < 1:
            raise ValueError(f"attention heads_per_step must be a positive int, got {heads_per_step}")
        return _tiled_attention(q, k, v, "keys", int(block_size), min(int(heads_per_step), b * h))
    raise AssertionError(impl)  # unreachable: resolve_impl validated it


def _einsum_attention(q, k, v):
    """Plain einsum-softmax-einsum; scores (B, H, N, N) in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=_F32) * scale
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=_F32)
    return out.astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Blockwise (flash-style) and query-block attention.
# Written by hand because neither jax nor flax ships a portable memory-efficient attention with
# a recomputing backward pass for CPU / pre-Ampere GPUs (jax's Pallas kernels are GPU/TPU only,
# cuDNN's needs compute capability >= 8.0).
#
# Layout inside: the batch and head axes are merged into one axis of B * H independent heads,
# cut into groups of `heads_per_step` heads, (groups, g, N, D). A `lax.map` runs the groups one
# after another; within a group a `lax.scan` walks the key blocks (online softmax forward; the
# backward recomputes each block's probabilities from the saved log-sum-exp). On CPU a small
# group keeps each (g, N, block) score tile in cache (tiny at 1,981 tokens and block 256: one
# head = a 2 MB tile) where all B * H heads at once stream 36 MB tiles through memory; measured
# 1.2x faster than all heads at once on 2 cores (docs/performance.md). On GPUs one group holds
# every head (a sequential loop over heads would starve the device).
# Padded keys get a -inf additive bias (a per-block vector), so each tile's
# scale/bias/exp is one elementwise pass fused behind its matmul.
# query_blocks uses the same custom VJP and head groups of one head, but its inner `lax.scan`
# walks query blocks: a (block, N) tile holds whole rows, so the forward's softmax is exact
# at once and the backward accumulates dK, dV (N, D) in the carry. Padded queries are zero rows
# that are cut off (the blocks are balanced: 1,981 rows in blocks of <= 256 are 8 x 248). On CPU
# this is the fastest layout measured: one head's 248 x 1,981 tile is 2 MB, every matmul is 2-D,
# the forward skips the online rescaling of a running output, the queries are scaled once
# instead of every tile, and the backward keeps its tiles transposed so that XLA:CPU sends all
# five of its matmuls to YNNPACK (two of them went to Eigen's slower path before).

ATTENTION_RESIDUALS = ("attention_out", "attention_lse")  # checkpoint_name tags of the saved residuals (fused_cpu's too)
_CPU_TILE_BYTES = 2 * 2**20  # target float32 (g, N, block) score tile on CPU (~ the L2 size)


def auto_heads_per_step(n_heads: int, n_tokens: int, block_size: int, device: jax.Device | None = None) -> int:
    """Heads per sequential step of blockwise attention: CPU, as many heads as keep one float32
    (heads, N, block) score tile within ~2 MiB (at least 1); elsewhere all of them."""
    device = device or jax.local_devices()[0]
    if device.platform != "cpu":
        return n_heads
    per_head = n_tokens * min(block_size, n_tokens) * 4
    most = max(1, min(n_heads, _CPU_TILE_BYTES // per_head))
    return -(-n_heads // -(-n_heads // most))  # the same number of steps, fewer padded heads


def _to_groups(x, g):
    """(B, N, H, D) -> (groups, g, N, D), heads b-major, zero heads padded at the end."""
    b, n, h, d = x.shape
    x = x.transpose(0, 2, 1, 3).reshape(b * h, n, d)
    groups = -(-(b * h) // g)
    if groups * g > b * h:
        x = jnp.pad(x, ((0, groups * g - b * h), (0, 0), (0, 0)))
    return x.reshape(groups, g, n, d)


def _from_groups(x, shape):
    """(groups, g, N, D) -> (B, N, H, D) of `shape`."""
    b, n, h, d = shape
    return x.reshape(-1, n, d)[: b * h].reshape(b, h, n, d).transpose(0, 2, 1, 3)


def _key_blocks(k, v, block_size):
    """Pad keys/values (g, N, D) to a multiple of block_size and split: (n_blocks, g, block, D)
    each, plus an additive bias (n_blocks, block): 0 for real keys, -inf for padding."""
    n = k.shape[1]
    n_blocks = -(-n // block_size)
    pad = n_blocks * block_size - n
    if pad:
        widths = ((0, 0), (0, pad), (0, 0))
        k = jnp.pad(k, widths)
        v = jnp.pad(v, widths)
    split = lambda a: jnp.moveaxis(a.reshape(a.shape[0], n_blocks, block_size, a.shape[2]), 1, 0)
    bias = jnp.where(jnp.arange(n_blocks * block_size) < n, 0.0, -jnp.inf).astype(_F32)
    return split(k), split(v), bias.reshape(n_blocks, block_size)


def _block_scores(q, k_block, bias, scale):
    """Scaled scores (g, N, block) in float32, padded keys at -inf (``bias``, from `_key_blocks`)."""
    return jnp.einsum("hqd,hkd->hqk", q, k_block, preferred_element_type=_F32) * scale + bias


def _group_forward(q, k, v, block_size):
    """One group, (g, N, D) each -> out (g, N, D) in q.dtype, log-sum-exp (g, N) float32."""
    g, n, d = q.shape
    scale = 1.0 / math.sqrt(d)
    k_blocks, v_blocks, bias = _key_blocks(k, v, block_size)

    def step(carry, block):
        m, l, acc = carry  # running max (g,N), normaliser (g,N), numerator (g,N,D)
        k_b, v_b, bias_b = block
        s = _block_scores(q, k_b, bias_b, scale)
        m_new = jnp.maximum(m, s.max(axis=-1))  # finite: every block holds >= 1 real key
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(axis=-1)
        pv = jnp.einsum("hqk,hkd->hqd", p.astype(v.dtype), v_b, preferred_element_type=_F32)
        acc = alpha[..., None] * acc + pv
        return (m_new, l, acc), None

    init = (jnp.full((g, n), -jnp.inf, _F32), jnp.zeros((g, n), _F32), jnp.zeros((g, n, d), _F32))
    (m, l, acc), _ = jax.lax.scan(step, init, (k_blocks, v_blocks, bias))
    return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)


def _group_backward(q, k, v, out, lse, d_out, block_size):
    """One group's dq, dk, dv (g, N, D); probabilities recomputed per key block from lse."""
    n, d = q.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(d)
    k_blocks, v_blocks, bias = _key_blocks(k, v, block_size)
    # delta_i = sum_d dO_i * O_i  (g, N): the softmax-backward correction term.
    delta = jnp.einsum("hqd,hqd->hq", d_out.astype(_F32), out.astype(_F32))

    def step(dq, block):
        k_b, v_b, bias_b = block
        s = _block_scores(q, k_b, bias_b, scale)
        p = jnp.exp(s - lse[..., None])  # (g, N, block)
        dv_b = jnp.einsum("hqk,hqd->hkd", p.astype(d_out.dtype), d_out, preferred_element_type=_F32)
        dp = jnp.einsum("hqd,hkd->hqk", d_out, v_b, preferred_element_type=_F32)
        ds = p * (dp - delta[..., None])  # d(scores) / scale
        dq = dq + jnp.einsum("hqk,hkd->hqd", ds.astype(k.dtype), k_b, preferred_element_type=_F32)
        dk_b = jnp.einsum("hqk,hqd->hkd", ds.astype(q.dtype), q, preferred_element_type=_F32)
        return dq, (dk_b, dv_b)

    dq, (dk_blocks, dv_blocks) = jax.lax.scan(step, jnp.zeros(q.shape, _F32), (k_blocks, v_blocks, bias))
    unsplit = lambda a: jnp.moveaxis(a, 0, 1).reshape(a.shape[1], -1, d)[:, :n]
    return ((dq * scale).astype(q.dtype), (unsplit(dk_blocks) * scale).astype(k.dtype),
            unsplit(dv_blocks).astype(v.dtype))


def _query_blocks(x, block_size):
    """(N, ...) -> (n_blocks, rows, ...), rows = ceil(N / n_blocks) <= block_size (the blocks are
    balanced, so at most n_blocks - 1 zero rows are padded at the end: 1,981 tokens in blocks of
    512 become 4 x 496, not 4 x 512)."""
    n = x.shape[0]
    n_blocks = -(-n // block_size)
    rows = -(-n // n_blocks)
    x = jnp.pad(x, ((0, n_blocks * rows - n),) + ((0, 0),) * (x.ndim - 1))
    return x.reshape(n_blocks, rows, *x.shape[1:])


def _scaled(q):
    """q / sqrt(head_dim), in q's dtype: scaling the (N, D) queries once costs less than scaling
    every (rows, N) score tile."""
    return (q.astype(_F32) * (1.0 / math.sqrt(q.shape[-1]))).astype(q.dtype)


def _head_forward_by_queries(q, k, v, block_size):
    """One head, (N, D) each, query block by query block -> out (N, D) in q.dtype, lse (N,) f32.
    Padded query rows (zeros) give finite rows that are cut off."""
    n, d = q.shape

    def step(_, q_b):
        s = jnp.einsum("qd,kd->qk", q_b, k, preferred_element_type=_F32)  # (rows, N), scaled
        m = s.max(axis=-1)
        p = jnp.exp(s - m[:, None])
        l = p.sum(axis=-1)
        o = jnp.einsum("qk,kd->qd", p.astype(v.dtype), v, preferred_element_type=_F32) / l[:, None]
        return None, (o, m + jnp.log(l))

    _, (out, lse) = jax.lax.scan(step, None, _query_blocks(_scaled(q), block_size))
    return out.reshape(-1, d)[:n].astype(q.dtype), lse.reshape(-1)[:n]


def _head_backward_by_queries(q, k, v, out, lse, d_out, block_size):
    """One head's dq, dk, dv (N, D): each query block's probabilities recomputed from lse; dK and
    dV accumulate over the blocks. Padded rows have q = dO = lse = delta = 0, so they add 0.

    The tiles are kept transposed, (N, rows), so that every matmul contracts the last axis of its
    left operand: XLA CPU hands those to YNNPACK, while a product contracting the first axis
    (P^T dO, dS^T Q in the untransposed layout) went to Eigen's slower packing path (perf: ~11 %
    of a tiny_s8 train step's CPU time in Eigen's gemm packing; fwd+bwd 13 % faster this way)."""
    n, d = q.shape
    scale = 1.0 / math.sqrt(d)
    delta = jnp.einsum("qd,qd->q", d_out.astype(_F32), out.astype(_F32))
    k_t = k.T  # (D, N), once per head, so that dQ^T = K^T dS^T is a plain product too

    def step(carry, block):
        dk, dv = carry
        q_b, qs_b, do_b, lse_b, delta_b = block  # qs_b: the scaled queries, for the scores
        s_t = jnp.einsum("kd,qd->kq", k, qs_b, preferred_element_type=_F32)  # (N, rows), scaled
        p_t = jnp.exp(s_t - lse_b[None, :])
        dv = dv + jnp.einsum("kq,qd->kd", p_t.astype(d_out.dtype), do_b, preferred_element_type=_F32)
        dp_t = jnp.einsum("kd,qd->kq", v, do_b, preferred_element_type=_F32)
        ds_t = p_t * (dp_t - delta_b[None, :])  # d(scores)^T / scale
        # dK from the unscaled queries, scaled once at the end: folding the scale into qs_b moved
        # float32 rounding enough that test_train's 4-vs-1-device check (16 AdamW steps) failed
        dk = dk + jnp.einsum("kq,qd->kd", ds_t.astype(q.dtype), q_b, preferred_element_type=_F32)
        dq_t = jnp.einsum("dk,kq->dq", k_t, ds_t.astype(k.dtype), preferred_element_type=_F32)  # (D, rows)
        return (dk, dv), dq_t

    blocks = tuple(_query_blocks(a, block_size) for a in (q, _scaled(q), d_out, lse, delta))
    (dk, dv), dq_t = jax.lax.scan(step, (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32)), blocks)
    dq = jnp.swapaxes(dq_t, 1, 2).reshape(-1, d)[:n]
    return (dq * scale).astype(q.dtype), (dk * scale).astype(k.dtype), dv.astype(v.dtype)


def _group_forward_by_queries(q, k, v, block_size):
    """A group of one head, (1, N, D): `_head_forward_by_queries` (2-D matmuls, measured faster
    on CPU than the same with a unit batch axis)."""
    out, lse = _head_forward_by_queries(q[0], k[0], v[0], block_size)
    return out[None], lse[None]


def _group_backward_by_queries(q, k, v, out, lse, d_out, block_size):
    grads = _head_backward_by_queries(q[0], k[0], v[0], out[0], lse[0], d_out[0], block_size)
    return tuple(g[None] for g in grads)


_TILINGS = {  # tiling -> (group forward, group backward)
    "keys": (_group_forward, _group_backward),
    "queries": (_group_forward_by_queries, _group_backward_by_queries),
}


def _map_groups(fn, *grouped):
    """fn over the leading (group) axis: a plain call for one group, else lax.map (sequential)."""
    if grouped[0].shape[0] == 1:
        return jax.tree.map(lambda a: a[None], fn(*(a[0] for a in grouped)))
    return jax.lax.map(lambda args: fn(*args), grouped)


def _tiled_forward(q, k, v, tiling, block_size, heads_per_step):
    """Returns out (B, N, H, D) in q.dtype and the log-sum-exp (B, H, N) float32."""
    b, n, h, _ = q.shape
    g = heads_per_step
    forward = _TILINGS[tiling][0]
    out, lse = _map_groups(lambda *a: forward(*a, block_size), *(_to_groups(a, g) for a in (q, k, v)))
    lse = lse.reshape(-1, n)[: b * h].reshape(b, h, n)
    return _from_groups(out, q.shape), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _tiled_attention(q, k, v, tiling, block_size, heads_per_step):
    """Blockwise ("keys") or query-block ("queries") attention, both with a recomputing backward."""
    return _tiled_forward(q, k, v, tiling, block_size, heads_per_step)[0]


def name_residuals(out, lse):
    """A custom VJP's output and log-sum-exp, named so that a remat policy can keep them
    (fwi_jax.model.fwi's "dots" does): then the backward pass needs no second forward pass."""
    return checkpoint_name(out, ATTENTION_RESIDUALS[0]), checkpoint_name(lse, ATTENTION_RESIDUALS[1])


def _tiled_fwd(q, k, v, tiling, block_size, heads_per_step):
    out, lse = name_residuals(*_tiled_forward(q, k, v, tiling, block_size, heads_per_step))
    return out, (q, k, v, out, lse)


def _tiled_bwd(tiling, block_size, heads_per_step, residuals, d_out):
    """Recompute each tile's probabilities from the saved log-sum-exp (no (N, N) residual)."""
    q, k, v, out, lse = residuals
    g = heads_per_step
    groups = lambda a: _to_groups(a, g)
    lse_groups = groups(lse.transpose(0, 2, 1)[..., None])[..., 0]  # (B,H,N) -> (groups, g, N)
    backward = _TILINGS[tiling][1]
    dq, dk, dv = _map_groups(lambda *a: backward(*a, block_size),
                             groups(q), groups(k), groups(v), groups(out), lse_groups, groups(d_out))
    return _from_groups(dq, q.shape), _from_groups(dk, k.shape), _from_groups(dv, v.shape)


_tiled_attention.defvjp(_tiled_fwd, _tiled_bwd)
