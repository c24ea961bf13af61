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

Build: the first use in a process compiles the kernel with the system C++ compiler ($CXX, else
g++ or c++ on PATH) against jaxlib's FFI headers, for this machine's CPU (-march=native, or
$FWI_JAX_KERNEL_ARCH), and caches the shared library under $FWI_JAX_CACHE/kernels (default
~/.cache/fwi_jax/kernels), keyed by the source, flags, compiler, jax version and CPU; later
processes load it without compiling. Where that is impossible (no compiler, not Linux)
`load_kernel` raises KernelBuildError saying why; `attention`'s "auto" then uses query_blocks and
says so on stderr.

This module imports nothing from the rest of the model: `fwi_jax.model.attention` builds on it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

SOURCE = Path(__file__).parent / "csrc" / "attention_cpu.cc"
HEAD_DIM_MULTIPLE = 16  # the micro-kernels step through head_dim in 16-float (AVX-512) vectors
_TARGETS = {
    "FwiAttentionForward": "fwi_attention_forward",
    "FwiAttentionBackward": "fwi_attention_backward",
}
# No -ffast-math: it would link crtfastmath.o, which turns on flush-to-zero for the whole process;
# the kernel's exp and max are written to vectorise without it.
_FLAGS = (
    "-std=c++17",
    "-O3",
    "-ffp-contract=fast",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fopenmp-simd",
    "-fPIC",
    "-shared",
)


class KernelBuildError(RuntimeError):
    """The fused attention kernel cannot be built or loaded on this machine."""


def find_compiler() -> str:
    """The C++ compiler the kernel is built with: $CXX if set (it must exist), else g++ or c++
    on PATH."""
    requested = os.environ.get("CXX")
    cxx = shutil.which(requested) if requested else shutil.which("g++") or shutil.which("c++")
    if not cxx:
        missing = (
            f"$CXX={requested!r} is not an executable" if requested else "no g++ or c++ on PATH"
        )
        raise KernelBuildError(
            f"attention 'fused_cpu' builds its kernel with a C++ compiler, and there is none "
            f"({missing}): install one (Debian/Ubuntu: apt install g++) or set "
            "model.attention=query_blocks"
        )
    return cxx


def compile_flags() -> tuple[str, ...]:
    """The kernel's compiler flags (-march from $FWI_JAX_KERNEL_ARCH, default native)."""
    return (*_FLAGS, f"-march={os.environ.get('FWI_JAX_KERNEL_ARCH', 'native')}")


def _cpu_id() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


def library_path(cxx: str | None = None) -> Path:
    """Where this machine's build of the kernel is cached (it may not exist yet)."""
    cxx = cxx or find_compiler()
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(compile_flags()), cxx, jax.__version__, _cpu_id()):
        key.update(part if isinstance(part, bytes) else part.encode())
    cache = Path(os.environ.get("FWI_JAX_CACHE") or Path.home() / ".cache" / "fwi_jax")
    return cache / "kernels" / f"attention_cpu-{key.hexdigest()[:16]}.so"


def _build(cxx: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [cxx, *compile_flags(), f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise KernelBuildError(
                f"building {SOURCE} failed:\n$ {' '.join(cmd)}\n{done.stderr[-4000:]}"
            )
        os.replace(built, target)  # atomic: a concurrent process sees no file or the whole file


@functools.cache
def load_kernel() -> Path:
    """Build (once per machine; cached) and load the kernel, and register its FFI targets for
    the CPU; returns the library's path. Raises KernelBuildError where that is impossible."""
    if sys.platform != "linux":
        raise KernelBuildError(
            f"attention 'fused_cpu' is built for Linux only, not "
            f"{sys.platform}: set model.attention=query_blocks"
        )
    cxx = find_compiler()
    path = library_path(cxx)
    if not path.exists():
        print(
            f"fwi_jax: building the fused CPU attention kernel ({SOURCE.name}, once per "
            f"machine) into {path}",
            file=sys.stderr,
            flush=True,
        )
        _build(cxx, path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise KernelBuildError(f"cannot load {path}: {err} (delete it to rebuild)") from err
    for symbol, target in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return path


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


def _partitioned(fn, n_args, lse_args=(), outputs=("x",)):
    def shardings(mesh, arg_shapes):
        x, lse = _specs(arg_shapes)
        args = tuple(NamedSharding(mesh, lse if i in lse_args else x) for i in range(n_args))
        outs = tuple(NamedSharding(mesh, lse if o == "lse" else x) for o in outputs)
        return args, outs

    def infer(block_size, mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[1]

    def partition(block_size, mesh, arg_shapes, result_shape):
        args, outs = shardings(mesh, arg_shapes)
        return mesh, lambda *a: fn(*a, block_size), outs, args

    wrapped = custom_partitioning(fn, static_argnums=(n_args,))
    letters = {"x": "b n h d", "lse": "b h n"}
    rule = ", ".join(letters["lse" if i in lse_args else "x"] for i in range(n_args))
    wrapped.def_partition(
        infer_sharding_from_operands=infer,
        partition=partition,
        sharding_rule=f"{rule} -> " + ", ".join(letters[o] for o in outputs),
    )
    return wrapped


_forward_partitioned = _partitioned(_ffi_forward, 3, outputs=("x", "lse"))
_backward_partitioned = _partitioned(_ffi_backward, 6, lse_args=(4,), outputs=("x", "x", "x"))


# vmap (an ensemble's members) folds the mapped axis into the batch axis, the leading axis of
# every operand and result: one kernel call over members x batch, no sequential loop.
@functools.cache
def _call(partitioned, block_size: int):
    f = jax.custom_batching.custom_vmap(lambda *arrays: partitioned(*arrays, block_size))

    @f.def_vmap
    def fold(axis_size, in_batched, *arrays):
        arrays = [
            a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, batched in zip(arrays, in_batched)
        ]
        outs = f(*(a.reshape(-1, *a.shape[2:]) for a in arrays))
        return tuple(o.reshape(axis_size, -1, *o.shape[1:]) for o in outs), (True,) * len(outs)

    return f


def forward(q, k, v, block_size: int):
    """q, k, v (B, N, H, D) -> out (B, N, H, D) in q's dtype, log-sum-exp (B, H, N) float32;
    ``block_size`` query rows per tile."""
    load_kernel()
    out, lse = _call(_forward_partitioned, int(block_size))(*_f32(q, k, v))
    return out.astype(q.dtype), lse


def backward(q, k, v, out, lse, d_out, block_size: int):
    """dq, dk, dv (B, N, H, D) in the dtypes of q, k, v, from `forward`'s out and lse and the
    output's cotangent d_out; ``block_size`` query rows per tile."""
    load_kernel()
    grads = _call(_backward_partitioned, int(block_size))(*_f32(q, k, v, out), lse, *_f32(d_out))
    return tuple(g.astype(a.dtype) for g, a in zip(grads, (q, k, v)))
