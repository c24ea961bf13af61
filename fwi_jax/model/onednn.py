"""Dense layers on oneDNN for XLA:CPU (config ``model.dense``): csrc/onednn_cpu.cc through the FFI.

``matmul(x, w)`` is x (..., K) @ w (K, N) by oneDNN's matmul primitive, which picks its kernel for
the CPU it runs on: AMX tiles, AVX-512 bfloat16 dot products, AVX-512 or AVX2. XLA:CPU's own dots
run on YNNPACK at about half of the float32 peak and cannot reach the AMX units; the figures are
in docs/performance.md. bfloat16 operands stay bfloat16 (float32 accumulation) where oneDNN has a
native bfloat16 kernel; on a CPU where it has only its reference code (no AVX-512), the operands
are widened to float32 on the way in and the result narrowed on the way out.

Implementations (``model.dense``):
- ``"xla"``: ``lax.dot_general`` (on CPU through `layers.dense`'s transposing backward pass);
- ``"onednn"``: the forward product on oneDNN; the backward pass stays XLA's;
- ``"auto"``: onednn for bfloat16 compute in programs compiled for the CPU where oneDNN has a
  native bfloat16 kernel (AMX or AVX-512 BF16; oneDNN is a dependency of the package on Linux
  x86-64), else xla (in float32, XLA's dots measured as fast as oneDNN's through the FFI); said
  once on stderr with the kernel oneDNN picked on this CPU.

oneDNN runs on its own OpenMP threads (the PyPI build), one per core, beside XLA's thread pool;
XLA's ops and the dense calls run one after another in an inference step. The library comes from
the ``onednn-cpu-gomp`` wheel and its headers from ``onednn-devel-cpu-gomp``; the kernel links
it by absolute path (rpath), built and cached as `fwi_jax.model.cpu_kernel` says.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fwi_jax.model.cpu_kernel import CpuKernel, KernelBuildError
from fwi_jax.model.target import target_platform

IMPLEMENTATIONS = ("auto", "xla", "onednn")
ONEDNN_WHEELS = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")


def _installed(dist: str, name: str) -> Path:
    """The folder holding file ``name`` of the installed wheel ``dist``."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise KernelBuildError(
            f"model.dense 'onednn' needs oneDNN, and the {dist} wheel is not installed "
            f"(pip install {' '.join(ONEDNN_WHEELS)}; the package depends on both on Linux "
            "x86-64), or set model.dense=xla"
        ) from None
    for f in files:
        if str(f).endswith(name):
            path = Path(importlib.metadata.distribution(dist).locate_file(f)).resolve()
            return path.parents[name.count("/")]  # the folder that `name` is relative to
    raise KernelBuildError(f"the {dist} wheel holds no {name}: reinstall it")


def _onednn_args() -> tuple[str, ...]:
    include = _installed("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp")
    lib = _installed("onednn-cpu-gomp", "libdnnl.so.3")
    # -fopenmp: the attention forward's task loop (OpenMP, the runtime oneDNN itself runs on)
    # -mprefer-vector-width=512: the softmax loops in AVX-512 registers (gcc's default is 256)
    return (
        "-fopenmp",
        "-mprefer-vector-width=512",
        f"-I{include}",
        f"-L{lib}",
        "-l:libdnnl.so.3",
        f"-Wl,-rpath,{lib}",
    )


KERNEL = CpuKernel(
    source="onednn_cpu.cc",
    targets=(
        ("FwiDense", "fwi_dense"),
        ("FwiOnednnAttentionForward", "fwi_onednn_attention_forward"),
    ),
    what="model.dense 'onednn'",
    instead="set model.dense=xla",
    extra_args=_onednn_args,
)


@functools.cache
def load() -> ctypes.CDLL:
    """Build (once per machine; cached) and load the library, and register its FFI targets;
    KernelBuildError where that is impossible."""
    return KERNEL.load()


@functools.cache
def implementation(dtype=jnp.float32) -> str:
    """The kernel oneDNN picks on this CPU for a product of ``dtype`` operands, e.g.
    "brg:avx512_core_amx" (builds and loads the library; KernelBuildError where it cannot)."""
    buf = ctypes.create_string_buffer(128)
    bf16 = int(jnp.dtype(dtype) == jnp.bfloat16)
    if load().FwiDenseImplementation(bf16, buf, len(buf)):
        return "none"
    return buf.value.decode()


def native_bfloat16() -> bool:
    """Whether oneDNN has a bfloat16 kernel on this CPU other than its reference code."""
    impl = implementation(jnp.bfloat16)
    return impl != "none" and not impl.startswith("ref")


_SAID: set[str] = set()


def resolve(impl: str, platform: str | None = None, dtype=None) -> str:
    """The implementation ``model.dense=impl`` runs in a program for ``platform`` (None: this
    process's default backend) computing in ``dtype``: "xla" or "onednn". "auto" says its choice
    once on stderr; a named "onednn" that cannot run raises ValueError (a program for another
    platform) or KernelBuildError (it cannot be built here)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown dense implementation {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}"
        )
    platform = target_platform(platform)
    if impl == "xla":
        return impl
    if platform != "cpu":
        if impl == "onednn":
            raise ValueError(
                f"model.dense 'onednn' is a CPU library; the program is compiled for {platform}"
            )
        return "xla"
    if impl == "onednn":
        load()
        return impl
    choice, reason = _auto(dtype)
    message = f"fwi_jax: model.dense=auto -> {choice} for cpu: {reason}"
    if message not in _SAID:
        _SAID.add(message)
        print(message, file=sys.stderr, flush=True)
    return choice


def _auto(dtype) -> tuple[str, str]:
    """(implementation, reason) of "auto" on a CPU for compute ``dtype``."""
    if dtype is None or jnp.dtype(dtype) != jnp.bfloat16:
        return "xla", "float32 dots run as fast on XLA's YNNPACK"
    try:
        impl = implementation(jnp.bfloat16)
    except KernelBuildError as err:
        return "xla", f"slower, because oneDNN cannot be used: {err}"
    if not native_bfloat16():
        return "xla", f"oneDNN has no native bfloat16 kernel on this CPU ({impl})"
    return "onednn", f"bfloat16 products on oneDNN's {impl}"


def _ffi(a, b, out_dtype):
    """a (..., K) @ b (K, N) -> (..., N) in out_dtype; a and b of one dtype."""
    out = jax.ShapeDtypeStruct((*a.shape[:-1], b.shape[-1]), out_dtype)
    call = jax.ffi.ffi_call("fwi_dense", out, vmap_method="sequential")
    return call(a, b)


# Under jit with a batch sharded over several CPU devices, XLA cannot split a custom call itself
# (it would gather the whole batch onto every device): each device multiplies its own rows by the
# whole (replicated) weight.
def _shardings(mesh, arg_shapes):
    spec = tuple(arg_shapes[0].sharding.spec)
    rank = len(arg_shapes[0].shape)
    rows = (*spec[: rank - 1], *(None,) * (rank - 1 - len(spec[: rank - 1])))
    x, w = NamedSharding(mesh, P(*rows, None)), NamedSharding(mesh, P(None, None))
    return (x, w), x


def _infer(out_dtype, mesh, arg_shapes, result_shape):
    return _shardings(mesh, arg_shapes)[1]


def _partition(out_dtype, mesh, arg_shapes, result_shape):
    args, out = _shardings(mesh, arg_shapes)
    return mesh, lambda a, b: _ffi(a, b, out_dtype), out, args


_partitioned = custom_partitioning(_ffi, static_argnums=(2,))
_partitioned.def_partition(
    infer_sharding_from_operands=_infer,
    partition=_partition,
    sharding_rule="... k, k n -> ... n",
)


# vmap: a mapped x alone is more rows of one product (its leading axes merge into M); mapped
# weights (stacked members) run one product per member.
@functools.cache
def _call(out_dtype: np.dtype):
    f = jax.custom_batching.custom_vmap(lambda a, b: _partitioned(a, b, out_dtype))

    @f.def_vmap
    def rule(axis_size, in_batched, a, b):
        a_mapped, b_mapped = in_batched
        if not b_mapped:
            return f(a, b), True
        a = a if a_mapped else jnp.broadcast_to(a, (axis_size, *a.shape))
        return jax.lax.map(lambda ab: f(*ab), (a, b)), True

    return f


def matmul(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """x (..., K) @ w (K, N) -> (..., N) on oneDNN, in ``out_dtype`` (default: x's). Operands in
    their common dtype if that is bfloat16 and oneDNN has a native bfloat16 kernel on this CPU,
    else in float32; oneDNN writes the result in bfloat16 only from bfloat16 operands."""
    load()
    f32, bf16 = np.dtype(jnp.float32), np.dtype(jnp.bfloat16)
    out_dtype = np.dtype(out_dtype or x.dtype)
    dtype = bf16 if jnp.result_type(x, w) == bf16 and native_bfloat16() else f32
    result = out_dtype if dtype == bf16 and out_dtype in (f32, bf16) else f32
    return _call(result)(x.astype(dtype), w.astype(dtype)).astype(out_dtype)
