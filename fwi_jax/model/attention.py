"""One attention function; the config picks its implementation.

Layout everywhere: q, k, v of shape (batch, tokens, heads, head_dim), the layout of
`jax.nn.dot_product_attention`. Output has the shape and dtype of q. Non-causal, no mask
(EVA02 attends over all patch tokens plus the cls token, N = 1,981 for 1,980 patches).

Implementations (``cfg.model.attention``), each kept for a platform that needs it:

- ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``, the plain formula; it
  materialises the (N, N) scores of every head. It lowers for every platform, it is what the
  others are tested against, and ``auto`` picks it on TPU and ROCm.
- ``"cudnn"``: the same library call with ``implementation="cudnn"``: cuDNN's fused flash
  attention, for NVIDIA GPUs of compute capability >= 8.0 (A100, H100), float16 or bfloat16
  compute. cuDNN needs such a GPU visible to the process even to trace the program; anywhere
  else it raises, never falls back.
- ``"blockwise"``: flash-style attention in pure JAX with a custom VJP, all heads at once: an
  online softmax over key blocks of ``block_size`` tokens; the backward pass recomputes the
  scores block by block from the saved log-sum-exp. Memory O(N * block_size) per head, never
  O(N^2). For NVIDIA GPUs without cuDNN flash attention (V100), and what ``auto`` lowers for
  CUDA in a process that sees no GPU (CI), where cuDNN cannot be traced.
- ``"query_blocks"``: the CPU layout of the same idea, also with a custom VJP: one head at a
  time, each sequential step takes ``block_size`` queries against all N keys, so every row's
  softmax is exact in one pass; the backward recomputes each probability tile, transposed to
  (N, block), and accumulates dK, dV. Its 2-D matmuls suit XLA:CPU (a sequential loop over heads
  would starve a GPU). ``auto``'s CPU choice where fused_cpu cannot run: no C++ compiler, not
  Linux, or head_dim not a multiple of 16.
- ``"fused_cpu"``: a C++ kernel for XLA:CPU through the XLA FFI (`fused_attention.py`,
  ``csrc/attention_cpu.cc``): the query-block layout again, but each score tile goes from its
  matmul through the softmax into the next matmul while it is in L2, which XLA:CPU cannot fuse
  from JAX code. Float32 inside (other dtypes are cast), head_dim a multiple of 16, built on
  first use with the system C++ compiler (cached). The fastest on CPU and ``auto``'s CPU choice
  (docs/performance.md). CPU only: a program compiled for another platform refuses it.
- ``"onednn"``: fused_cpu's custom VJP with the forward pass on oneDNN's matmuls
  (`fused_attention.forward_onednn`, ``csrc/onednn_cpu.cc``): per block of queries of one head,
  the score product into a float32 tile, the softmax, the P V product; bfloat16 operands stay
  bfloat16 where oneDNN has native bfloat16 kernels (AMX, AVX-512 BF16), so a bfloat16 model's
  attention runs on the CPU's bfloat16 units. The backward pass is fused_cpu's (float32).
- ``"auto"``: decided for the platform the program is compiled for (`resolve_impl`; the model
  passes its build platform, `fwi_jax.model.target`), not for the process's default backend:
  cpu -> onednn for bfloat16 compute where oneDNN has native bfloat16 kernels, else fused_cpu
  (else query_blocks); cuda -> cudnn where every visible GPU has compute
  capability >= 8.0 and the compute dtype is float16 or bfloat16, else blockwise (older GPUs,
  float32, or no GPU visible); rocm, tpu -> xla. The choice and its reason are said once per
  process on stderr.

Not offered: an einsum-softmax-einsum (the maths of "xla", which the tests keep as their own
reference), and blockwise over sequential groups of heads on CPU (query_blocks is the CPU
layout).

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

import fwi_jax.model.fused_attention as fused
from fwi_jax.model import onednn
from fwi_jax.model.rope import rotate_tokens
from fwi_jax.model.target import cuda_capabilities, target_platform

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "blockwise", "query_blocks", "fused_cpu", "onednn")
CPU_KERNELS = ("fused_cpu", "onednn")  # the C++ kernels: CPU only, head_dim a multiple of 16
# block_size=None means each implementation's own block (docs/performance.md): blockwise's key
# block, query_blocks' and fused_cpu's query block (fused_cpu's forward tile of 64 rows x N keys
# stays in L2 beside K^T and V). fused_cpu's backward pass, which walks the keys 256 at a time,
# runs best on blocks of 256 queries: its default block, unless block_size sets both passes'.
DEFAULT_BLOCKS = {"blockwise": 256, "query_blocks": 256, "fused_cpu": 64, "onednn": 128}
FUSED_CPU_BACKWARD_BLOCK = 256
CUDNN_MIN_CAPABILITY = 8.0  # cuDNN's fused flash attention: Ampere (sm80) and newer,
CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)  # in 16-bit floats,
CUDNN_MAX_HEAD_DIM = 128  # with heads of <= 128 (a multiple of 8; every EVA02 size has 64)
# checkpoint_name tags of the recomputing implementations' saved residuals (output, log-sum-exp)
ATTENTION_RESIDUALS = ("attention_out", "attention_lse")

_F32 = jnp.float32


def resolve_impl(
    impl: str, platform: str | None = None, head_dim: int | None = None, dtype=None
) -> str:
    """The implementation that attention ``impl`` runs in a program compiled for ``platform``
    (None: this process's default backend), for heads of ``head_dim`` in ``dtype`` (None: not
    known yet).

    "auto" follows the rule in the module docstring and says its choice once on stderr. A
    named implementation is returned as it is, or refused with a ValueError saying why where
    it cannot run: fused_cpu for anything but cpu; cudnn without a GPU of compute capability
    >= 8.0 in this process, or for float32 or a head_dim cuDNN does not take.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}"
        )
    platform = target_platform(platform)
    if impl == "auto":
        choice, reason = _auto(platform, head_dim, dtype)
        _say_once(f"fwi_jax: model.attention=auto -> {choice} for {platform}: {reason}")
        return choice
    if impl in CPU_KERNELS and platform != "cpu":
        raise ValueError(
            f"attention {impl!r} is a CPU kernel; the program is compiled for "
            f"{platform} (model.attention=auto picks cudnn or blockwise there)"
        )
    if impl == "cudnn" and (reason := _cudnn_unsupported(platform, head_dim, dtype)):
        raise ValueError(
            f"attention 'cudnn' cannot run: {reason}. Use model.attention=auto, blockwise or xla."
        )
    return impl


def _cudnn_unsupported(platform: str, head_dim: int | None, dtype) -> str | None:
    """Why cuDNN's flash attention cannot run in a program for ``platform`` here, or None."""
    if platform != "cuda":
        return f"cuDNN is a CUDA library and the program is compiled for {platform}"
    capabilities = cuda_capabilities()
    if not capabilities:
        return (
            "this process sees no CUDA GPU, and cuDNN attention can be neither checked nor "
            "traced without one"
        )
    if min(capabilities) < CUDNN_MIN_CAPABILITY:
        return (
            f"compute capability {min(capabilities)} has no cuDNN flash attention (needs >= "
            f"{CUDNN_MIN_CAPABILITY})"
        )
    if dtype is not None and jnp.dtype(dtype) not in CUDNN_DTYPES:
        return (
            f"cuDNN flash attention takes float16 or bfloat16, not {jnp.dtype(dtype).name} "
            "(model.dtype)"
        )
    if head_dim is not None and (head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM):
        return (
            f"cuDNN flash attention takes head_dim <= {CUDNN_MAX_HEAD_DIM} and a multiple "
            f"of 8, not {head_dim}"
        )
    return None


def _auto(platform: str, head_dim: int | None, dtype) -> tuple[str, str]:
    """(implementation, reason) of "auto" for ``platform``."""
    if platform == "cpu":
        if head_dim is not None and head_dim % fused.HEAD_DIM_MULTIPLE:
            return "query_blocks", (
                f"head_dim {head_dim} is not a multiple of "
                f"{fused.HEAD_DIM_MULTIPLE}, which fused_cpu needs"
            )
        try:
            fused.load_kernel()
        except fused.KernelBuildError as err:
            return "query_blocks", f"slower, because the fused_cpu kernel is unavailable: {err}"
        if dtype is None or jnp.dtype(dtype) != jnp.bfloat16:
            return "fused_cpu", "the fused C++ kernel is built"
        try:
            native = onednn.native_bfloat16()
        except fused.KernelBuildError as err:
            return "fused_cpu", f"float32 inside, because oneDNN is unavailable: {err}"
        if not native:
            return "fused_cpu", "oneDNN has no native bfloat16 kernel on this CPU"
        return "onednn", f"bfloat16 products on oneDNN's {onednn.implementation(jnp.bfloat16)}"
    if platform == "cuda":
        if reason := _cudnn_unsupported(platform, head_dim, dtype):
            return "blockwise", reason
        return "cudnn", (f"compute capability {min(cuda_capabilities())} has cuDNN flash attention")
    return "xla", "no fused or blockwise implementation is tuned for this platform"


@functools.cache
def _say_once(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    impl: str = "xla",
    block_size: int | None = None,
    platform: str | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Softmax(q k^T / sqrt(d)) v, non-causal, no mask; with ``rope`` = (sin, cos), (M, D)
    tables, q and k's last M tokens are first rotated (`rope.rotate_tokens`).

    q, k, v: (batch, tokens, heads, head_dim), same dtype. Returns (batch, tokens, heads,
    head_dim) in q's dtype. ``impl``: one of IMPLEMENTATIONS, resolved for ``platform`` (the
    platform the program is compiled for; None: this process's default backend) by
    `resolve_impl`. ``block_size`` is the key block of "blockwise" and the query block of
    "query_blocks" and "fused_cpu" (any positive int; the token count need not be a multiple of
    it; None: `DEFAULT_BLOCKS`, and `FUSED_CPU_BACKWARD_BLOCK` for fused_cpu's backward pass).
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            "attention expects q, k, v of one shape (batch, tokens, heads, "
            f"head_dim); got {q.shape}, {k.shape}, {v.shape}"
        )
    impl = resolve_impl(impl, platform, q.shape[-1], q.dtype)
    if rope is not None and impl != "onednn":  # only onednn's kernel rotates as it reads
        q, k = (rotate_tokens(a, *rope) for a in (q, k))
        rope = None
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    if impl == "cudnn":
        return even_length_attention(q, k, v, implementation="cudnn")
    if block_size is None:
        block = DEFAULT_BLOCKS[impl]
        backward_block = FUSED_CPU_BACKWARD_BLOCK if impl in CPU_KERNELS else block
    elif block_size < 1:
        raise ValueError(f"attention block_size must be a positive int, got {block_size}")
    else:
        block = backward_block = int(block_size)
    if impl in CPU_KERNELS and (reason := fused.unsupported(q.shape)):
        raise ValueError(f"attention impl {impl!r} {reason}")
    if impl == "onednn":
        sin, cos = rope if rope is not None else (jnp.zeros((0, q.shape[-1])),) * 2
        return _onednn_attention(q, k, v, sin, cos, block, backward_block)
    return _recomputing_attention(q, k, v, impl, block, backward_block)


def even_length_attention(q, k, v, implementation: str = "cudnn"):
    """``jax.nn.dot_product_attention`` on an even number of tokens: an odd count (EVA02's 1,981)
    gets one zero token more, hidden from every query by the padding mask (the sequence lengths)
    and sliced off the output, so values and gradients are those of the unpadded call.

    Workaround for a JAX bug (0.10): its cuDNN wrapper stands an empty array in for an absent
    bias and then counts it as a bias, so the cuDNN backward pass refuses odd sequence lengths
    ("Unsupported sequence length Q 1981, KV 1981") whenever a train step is compiled. Even
    lengths pass. ``implementation="xla"`` runs the same padding where there is no GPU (the
    test)."""
    n = q.shape[1]
    if n % 2 == 0:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    pad = ((0, 0), (0, 1), (0, 0), (0, 0))
    # the lengths are computed from q (times 0), not made as a constant, so that under vmap (the
    # stacked ensemble's members) they carry q's batch axis: JAX's cuDNN batching rule folds
    # that axis into the batch of every argument and fails on an unbatched length vector
    lengths = q[:, 0, 0, 0].astype(jnp.int32) * 0 + n
    out = jax.nn.dot_product_attention(
        *(jnp.pad(t, pad) for t in (q, k, v)),
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )
    return out[:, :n]


# ----------------------------------------------------------------------------------------------
# blockwise, query_blocks and fused_cpu: one custom VJP. The forward pass saves q, k, v, the
# output and the log-sum-exp (B, H, N); the backward pass recomputes each tile's probabilities
# from them, so no (N, N) array is ever saved.
#
# blockwise and query_blocks are written by hand because neither jax nor flax ships a portable
# memory-efficient attention with a recomputing backward pass for CPUs and pre-Ampere GPUs
# (jax's Pallas kernels are GPU/TPU only, cuDNN's needs compute capability >= 8.0).
#
# blockwise: the batch and head axes merge into one axis of B * H independent heads, (g, N, D),
# and a `lax.scan` walks the key blocks (online softmax forward; the backward recomputes each
# block's probabilities from the saved log-sum-exp). Padded keys get a -inf additive bias (a
# per-block vector), so each tile's scale/bias/exp is one elementwise pass behind its matmul.
#
# query_blocks: a `lax.map` runs the B * H heads one after another; within a head a `lax.scan`
# walks query blocks: a (block, N) tile holds whole rows, so the forward's softmax is exact at
# once (no online rescaling of a running output), and the backward accumulates dK, dV (N, D) in
# the carry. Padded queries are zero rows that are cut off (the blocks are balanced: 1,981 rows
# in blocks of <= 256 are 8 x 248). Every matmul is 2-D, the queries are scaled once instead of
# every tile, and the backward keeps its tiles transposed so that XLA:CPU sends all five of its
# matmuls to YNNPACK (docs/performance.md).


def _to_heads(x):
    """(B, N, H, D) -> (B * H, N, D), heads b-major."""
    b, n, h, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b * h, n, d)


def _from_heads(x, shape):
    """(B * H, N, D) -> (B, N, H, D) of ``shape``."""
    b, n, h, d = shape
    return x.reshape(b, h, n, d).transpose(0, 2, 1, 3)


def _forward(impl, q, k, v, block_size):
    """out (B, N, H, D) in q.dtype and the log-sum-exp (B, H, N) float32."""
    if impl == "fused_cpu":
        return fused.forward(q, k, v, block_size)
    if impl == "onednn":
        return fused.forward_onednn(q, k, v, block_size)
    b, n, h, _ = q.shape
    heads = tuple(_to_heads(a) for a in (q, k, v))
    if impl == "blockwise":
        out, lse = _keys_forward(*heads, block_size)
    else:
        out, lse = jax.lax.map(lambda a: _head_forward_by_queries(*a, block_size), heads)
    return _from_heads(out, q.shape), lse.reshape(b, h, n)


def _backward(impl, q, k, v, out, lse, d_out, block_size):
    """dq, dk, dv (B, N, H, D) in the dtypes of q, k, v."""
    if impl in CPU_KERNELS:
        return fused.backward(q, k, v, out, lse, d_out, block_size)
    b, n, h, _ = q.shape
    heads = (*(_to_heads(a) for a in (q, k, v, out)), lse.reshape(b * h, n), _to_heads(d_out))
    if impl == "blockwise":
        grads = _keys_backward(*heads, block_size)
    else:
        grads = jax.lax.map(lambda a: _head_backward_by_queries(*a, block_size), heads)
    return tuple(_from_heads(g, q.shape) for g in grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _recomputing_attention(q, k, v, impl, block_size, backward_block_size):
    return _forward(impl, q, k, v, block_size)[0]


def _recomputing_fwd(q, k, v, impl, block_size, backward_block_size):
    # named so that a remat policy can keep them (fwi_jax.model.fwi's "dots" does): then the
    # backward pass needs no second forward pass
    out, lse = _forward(impl, q, k, v, block_size)
    out = checkpoint_name(out, ATTENTION_RESIDUALS[0])
    lse = checkpoint_name(lse, ATTENTION_RESIDUALS[1])
    return out, (q, k, v, out, lse)


def _recomputing_bwd(impl, block_size, backward_block_size, residuals, d_out):
    return _backward(impl, *residuals, d_out, backward_block_size)


_recomputing_attention.defvjp(_recomputing_fwd, _recomputing_bwd)


# onednn: fused_cpu's custom VJP with RoPE moved into the forward kernel (it rotates q and k as
# it copies each head, saving XLA a pass over both). The backward pass rotates them in JAX,
# runs fused_cpu's backward and takes dq, dk back through the rotation.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _onednn_attention(q, k, v, sin, cos, block_size, backward_block_size):
    return fused.forward_onednn(q, k, v, block_size, _tables(sin, cos))[0]


def _tables(sin, cos):
    return (sin, cos) if sin.shape[0] else None


def _onednn_fwd(q, k, v, sin, cos, block_size, backward_block_size):
    out, lse = fused.forward_onednn(q, k, v, block_size, _tables(sin, cos))
    out = checkpoint_name(out, ATTENTION_RESIDUALS[0])
    lse = checkpoint_name(lse, ATTENTION_RESIDUALS[1])
    return out, (q, k, v, sin, cos, out, lse)


def _onednn_bwd(block_size, backward_block_size, residuals, d_out):
    q, k, v, sin, cos, out, lse = residuals
    tables = _tables(sin, cos)
    rotate = (lambda a: rotate_tokens(a, sin, cos)) if tables else (lambda a: a)
    (qr, pull_q), (kr, pull_k) = jax.vjp(rotate, q), jax.vjp(rotate, k)
    dq, dk, dv = fused.backward(qr, kr, v, out, lse, d_out, backward_block_size)
    return pull_q(dq)[0], pull_k(dk)[0], dv, jnp.zeros_like(sin), jnp.zeros_like(cos)


_onednn_attention.defvjp(_onednn_fwd, _onednn_bwd)


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
    """Scaled scores (g, N, block) in float32, padded keys at -inf (``bias`` of `_key_blocks`)."""
    return jnp.einsum("hqd,hkd->hqk", q, k_block, preferred_element_type=_F32) * scale + bias


def _keys_forward(q, k, v, block_size):
    """All heads at once, (g, N, D) each -> out (g, N, D) in q.dtype, log-sum-exp (g, N)
    float32."""
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


def _keys_backward(q, k, v, out, lse, d_out, block_size):
    """dq, dk, dv (g, N, D) of all heads; probabilities recomputed per key block from lse."""
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

    dq, (dk_blocks, dv_blocks) = jax.lax.scan(
        step, jnp.zeros(q.shape, _F32), (k_blocks, v_blocks, bias)
    )
    unsplit = lambda a: jnp.moveaxis(a, 0, 1).reshape(a.shape[1], -1, d)[:, :n]
    return (
        (dq * scale).astype(q.dtype),
        (unsplit(dk_blocks) * scale).astype(k.dtype),
        unsplit(dv_blocks).astype(v.dtype),
    )


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
    (P^T dO, dS^T Q in the untransposed layout) went to Eigen's slower packing path
    (docs/performance.md)."""
    n, d = q.shape
    scale = 1.0 / math.sqrt(d)
    delta = jnp.einsum("qd,qd->q", d_out.astype(_F32), out.astype(_F32))
    k_t = k.T  # (D, N), once per head, so that dQ^T = K^T dS^T is a plain product too

    def step(carry, block):
        dk, dv = carry
        q_b, qs_b, do_b, lse_b, delta_b = block  # qs_b: the scaled queries, for the scores
        s_t = jnp.einsum("kd,qd->kq", k, qs_b, preferred_element_type=_F32)  # (N, rows), scaled
        p_t = jnp.exp(s_t - lse_b[None, :])
        dv = dv + jnp.einsum(
            "kq,qd->kd", p_t.astype(d_out.dtype), do_b, preferred_element_type=_F32
        )
        dp_t = jnp.einsum("kd,qd->kq", v, do_b, preferred_element_type=_F32)
        ds_t = p_t * (dp_t - delta_b[None, :])  # d(scores)^T / scale
        # dK from the unscaled queries, scaled once at the end: folding the scale into qs_b moved
        # float32 rounding enough that test_train's 4-vs-1-device check (16 AdamW steps) failed
        dk = dk + jnp.einsum("kq,qd->kd", ds_t.astype(q.dtype), q_b, preferred_element_type=_F32)
        dq_t = jnp.einsum(
            "dk,kq->dq", k_t, ds_t.astype(k.dtype), preferred_element_type=_F32
        )  # (D, rows)
        return (dk, dv), dq_t

    blocks = tuple(_query_blocks(a, block_size) for a in (q, _scaled(q), d_out, lse, delta))
    zeros = (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32))
    (dk, dv), dq_t = jax.lax.scan(step, zeros, blocks)
    dq = jnp.swapaxes(dq_t, 1, 2).reshape(-1, d)[:n]
    return (dq * scale).astype(q.dtype), (dk * scale).astype(k.dtype), dv.astype(v.dtype)
