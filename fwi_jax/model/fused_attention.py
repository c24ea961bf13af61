"""Fused CPU attention: a C++ kernel (csrc/attention_cpu.cc) called through the XLA FFI.

`forward` and `backward` are the two passes of ``attention(impl="fused_cpu")``, whose custom VJP
(in `fwi_jax.model.attention`, shared with the pure-JAX implementations) saves q, k, v, the output
and the log-sum-exp (B, H, N), and recomputes each score tile in the backward pass: memory per
thread is one float32 score tile, (block, N) in the forward and (block, 256) in the backward,
plus a few (N, D) copies of one head's K, V, Q, dO, dK, dV, never (N, N). q, k, v are
(batch, tokens, heads, head_dim) with head_dim a multiple of 16, non-causal, scale
1/sqrt(head_dim). The kernel computes in float32 (other dtypes are cast on the way in and out).

Why a C++ kernel: XLA:CPU runs the score matmul, the softmax and the next matmul as separate
kernels with each (rows, N) tile written to memory between them; the kernel keeps the tile in L2
and multiplies it where it lies (the source's header says how; docs/performance.md has the
measurements).

Build: `fwi_jax.model.cpu_kernel` compiles the source on first use for this machine's CPU and
caches the library. Where that is impossible (no compiler, not Linux) `load_kernel` raises
KernelBuildError saying why; `attention`'s "auto" then uses query_blocks and says so on stderr.

``forward_onednn`` is the forward pass of ``attention(impl="onednn")``: the same layout and
outputs from oneDNN's matmuls (csrc/onednn_cpu.cc), in bfloat16 where the CPU has bfloat16 dot
products; its backward pass is this kernel's.

This module imports only the CPU-kernel modules (`cpu_kernel`, `onednn`) of the model:
`fwi_jax.model.attention` builds on it.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fwi_jax.model import onednn
from fwi_jax.model.cpu_kernel import CpuKernel, KernelBuildError, compile_flags, find_compiler

__all__ = ["KernelBuildError", "compile_flags", "find_compiler", "forward", "backward"]

HEAD_DIM_MULTIPLE = 16  # the micro-kernels step through head_dim in 16-float (AVX-512) vectors
_TARGETS = {
    "FwiAttentionForward": "fwi_attention_forward",
    "FwiAttentionBackward": "fwi_attention_backward",
}
KERNEL = CpuKernel(
    source="attention_cpu.cc",
    targets=tuple(_TARGETS.items()),
    what="attention 'fused_cpu'",
    instead="set model.attention=query_blocks",
)
SOURCE = KERNEL.path


def library_path(cxx: str | None = None):
    """Where this machine's build of the kernel is cached (it may not exist yet)."""
    return KERNEL.library_path(cxx)


@functools.cache
def load_kernel():
    """Build (once per machine; cached) and load the kernel, and register its FFI targets for
    the CPU; returns the library's path. Raises KernelBuildError where that is impossible."""
    KERNEL.load()
    return library_path()


_CALL = re.compile(
    r"\(f32\[(\d+),(\d+),(\d+),(\d+)\]"
    r".*custom_call_target=\"fwi_attention_(forward|backward)\""
)


def kernel_flops(hlo_text: str) -> float:
    """FLOPs of the kernel's calls in a compiled program's HLO text, which XLA's cost analysis
    counts as 0: per head 2 matmuls of N x N x D forward, 5 backward, 2 FLOPs a multiply-add.
    Calls inside loops count once."""
    total = 0.0
    for line in hlo_text.splitlines():
        if m := _CALL.search(line):
            b, n, h, d = map(int, m.groups()[:4])
            total += (4 if m.group(5) == "forward" else 10) * b * h * n * n * d
    return total


def unsupported(shape: tuple[int, ...]) -> str | None:
    """Why the kernel cannot run attention of q's ``shape`` (B, N, H, D), or None. (That it runs
    on CPUs only is `attention.resolve_impl`'s check: it knows the platform compiled for.)"""
    if shape[-1] % HEAD_DIM_MULTIPLE:
        return (
            f"needs head_dim a multiple of {HEAD_DIM_MULTIPLE} (every EVA02 size has 64); "
            f"got {shape[-1]} (model.attention=query_blocks runs any)"
        )
    return None


def _f32(*arrays):
    return tuple(a.astype(jnp.float32) for a in arrays)


def _ffi_forward(q, k, v, block_size):
    """float32 (B, N, H, D) x3 -> out (B, N, H, D), lse (B, H, N)."""
    b, n, h, _ = q.shape
    return jax.ffi.ffi_call(
        _TARGETS["FwiAttentionForward"],
        (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, n), jnp.float32)),
    )(q, k, v, block=int(block_size))


def _ffi_onednn_forward(q, k, v, sin, cos, block_size):
    """(B, N, H, D) x3 float32 or bfloat16, RoPE tables sin, cos (M, D) float32 for the last M
    tokens of q and k (M = 0: none) -> out (B, N, H, D) of q's dtype, lse (B, H, N)."""
    b, n, h, _ = q.shape
    return jax.ffi.ffi_call(
        "fwi_onednn_attention_forward",
        (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, n), jnp.float32)),
    )(q, k, v, sin, cos, block=int(block_size))


def _ffi_backward(q, k, v, out, lse, d_out, block_size):
    """float32 q, k, v, out, d_out (B, N, H, D), lse (B, H, N) -> dq, dk, dv."""
    return jax.ffi.ffi_call(
        _TARGETS["FwiAttentionBackward"],
        tuple(jax.ShapeDtypeStruct(q.shape, jnp.float32) for _ in range(3)),
    )(q, k, v, out, lse, d_out, block=int(block_size))


# Under jit with sharded inputs (data parallelism over several CPU devices) XLA cannot split a
# custom call on its own: it would gather every input and run all heads on every device. These
# rules keep the batch and head axes as the caller sharded them and each device's kernel runs
# on its own shard (tokens and head_dim whole: every query needs every key).
def _specs(arg_shapes):
    spec = tuple(arg_shapes[0].sharding.spec) + (None,) * 4
    batch, heads = spec[0], spec[2]
    return P(batch, None, heads, None), P(batch, heads, None)


def _partitioned(fn, n_args, lse_args=(), outputs=("x",), table_args=()):
    # table_args: (M, D) operands every device needs whole (the RoPE tables)
    def spec(i, x, lse):
        return P(None, None) if i in table_args else lse if i in lse_args else x

    def shardings(mesh, arg_shapes):
        x, lse = _specs(arg_shapes)
        args = tuple(NamedSharding(mesh, spec(i, x, lse)) for i in range(n_args))
        outs = tuple(NamedSharding(mesh, lse if o == "lse" else x) for o in outputs)
        return args, outs

    def infer(block_size, mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[1]

    def partition(block_size, mesh, arg_shapes, result_shape):
        args, outs = shardings(mesh, arg_shapes)
        return mesh, lambda *a: fn(*a, block_size), outs, args

    wrapped = custom_partitioning(fn, static_argnums=(n_args,))
    letters = {"x": "b n h d", "lse": "b h n", "table": "m d"}
    kinds = ("table" if i in table_args else "lse" if i in lse_args else "x" for i in range(n_args))
    rule = ", ".join(letters[kind] for kind in kinds)
    wrapped.def_partition(
        infer_sharding_from_operands=infer,
        partition=partition,
        sharding_rule=f"{rule} -> " + ", ".join(letters[o] for o in outputs),
    )
    return wrapped


_forward_partitioned = _partitioned(_ffi_forward, 3, outputs=("x", "lse"))
_onednn_forward_partitioned = _partitioned(
    _ffi_onednn_forward, 5, outputs=("x", "lse"), table_args=(3, 4)
)
_backward_partitioned = _partitioned(_ffi_backward, 6, lse_args=(4,), outputs=("x", "x", "x"))


# vmap (an ensemble's members) folds the mapped axis into the batch axis, the leading axis of
# every operand and result but the tables: one kernel call over members x batch, no loop.
@functools.cache
def _call(partitioned, block_size: int, tables: tuple[int, ...] = ()):
    f = jax.custom_batching.custom_vmap(lambda *arrays: partitioned(*arrays, block_size))

    @f.def_vmap
    def fold(axis_size, in_batched, *arrays):
        if any(in_batched[i] for i in tables):
            raise NotImplementedError("attention under vmap takes one RoPE table for all")
        arrays = [
            a if batched or i in tables else jnp.broadcast_to(a, (axis_size, *a.shape))
            for i, (a, batched) in enumerate(zip(arrays, in_batched))
        ]
        outs = f(*(a if i in tables else a.reshape(-1, *a.shape[2:]) for i, a in enumerate(arrays)))
        return tuple(o.reshape(axis_size, -1, *o.shape[1:]) for o in outs), (True,) * len(outs)

    return f


def forward(q, k, v, block_size: int):
    """q, k, v (B, N, H, D) -> out (B, N, H, D) in q's dtype, log-sum-exp (B, H, N) float32;
    ``block_size`` query rows per tile."""
    load_kernel()
    out, lse = _call(_forward_partitioned, int(block_size))(*_f32(q, k, v))
    return out.astype(q.dtype), lse


def forward_onednn(q, k, v, block_size: int, rope=None):
    """`forward` on oneDNN's products (`fwi_jax.model.onednn`; attention "onednn"): bfloat16
    q, k, v stay bfloat16 where oneDNN has native bfloat16 kernels on this CPU, anything else
    runs in float32. ``rope``: (sin, cos) (M, D) tables that rotate the last M tokens of q and k
    as `rope.rotate_tokens` does, applied while the kernel copies them (None: q, k as given)."""
    onednn.load()
    dtype = q.dtype if q.dtype == jnp.bfloat16 and onednn.native_bfloat16() else jnp.float32
    d = q.shape[-1]
    sin, cos = rope if rope is not None else (jnp.zeros((0, d)), jnp.zeros((0, d)))
    args = (*(a.astype(dtype) for a in (q, k, v)), *(t.astype(jnp.float32) for t in (sin, cos)))
    out, lse = _call(_onednn_forward_partitioned, int(block_size), (3, 4))(*args)
    return out.astype(q.dtype), lse


def backward(q, k, v, out, lse, d_out, block_size: int):
    """dq, dk, dv (B, N, H, D) in the dtypes of q, k, v, from `forward`'s out and lse and the
    output's cotangent d_out; ``block_size`` query rows per tile."""
    load_kernel()
    grads = _call(_backward_partitioned, int(block_size))(*_f32(q, k, v, out), lse, *_f32(d_out))
    return tuple(g.astype(a.dtype) for g, a in zip(grads, (q, k, v)))
