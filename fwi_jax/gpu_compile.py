"""Compile this package's GPU programs for a GPU this machine does not have, and read how much
device memory they need (deviceless ahead-of-time compilation).

Lowering (tests/test_gpu_lowering.py) checks what a program holds; compiling also runs XLA's GPU
compiler (fusion, scheduling, buffer assignment) and reports the program's memory. With the CUDA
plugin installed (``pip install -e .[gpu-compile]``) and ``JAX_PLATFORMS=cpu``, JAX makes
compile-only devices from a GPU target description (``jax.experimental.topologies``), and
``jit(...).lower(...).compile()`` on them compiles for that GPU without one. The descriptions
are in ``gpu_targets/`` (``*.txtpb``: XLA's ``GpuTargetConfigProto`` in text form; each file's
comment gives the card's published figures).

The model is built and traced as a process on the target GPU builds it
(``fwi_jax.model.target.compiling_for`` its compute capability): ``model.attention=auto`` gives
cuDNN's flash attention on compute capability >= 8.0 in 16 bits (compiling it needs the cuDNN
library of the gpu-compile extra) and ``blockwise`` on the V100.

Peak memory = XLA's argument + output + temporary bytes - the donated (aliased) bytes of the
compiled program: what the device must hold at once, before the allocator's slack and cuDNN/cuBLAS
workspaces (hence the 10 % headroom of ``fits``).

    python -m fwi_jax.gpu_compile --config base_s6 --targets v100_32gb h100 --batch 8 \
        --remat none full
    python -m fwi_jax.gpu_compile --config base_s6 --targets l4 --largest-batch
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pathlib
import re
import sys
import time
from typing import Any

TARGET_DIR = pathlib.Path(__file__).resolve().parent / "gpu_targets"
HEADROOM = 0.9  # a program fits when its peak is at most this share of the card's memory
GIB = 2.0**30


class CompileUnavailable(RuntimeError):
    """The CUDA plugin that compiles for a GPU is not installed."""


def target_names() -> list[str]:
    return sorted(p.stem for p in TARGET_DIR.glob("*.txtpb"))


def target_text(name: str) -> str:
    path = TARGET_DIR / f"{name}.txtpb"
    if not path.is_file():
        raise ValueError(f"unknown GPU target {name!r}; choose one of {', '.join(target_names())}")
    return path.read_text()


def target_memory_bytes(name: str) -> int:
    return int(re.search(r"device_memory_size:\s*(\d+)", target_text(name)).group(1))


def target_capability(name: str) -> float:
    m = re.search(r"major:\s*(\d+)\s+minor:\s*(\d+)", target_text(name))
    return float(f"{m.group(1)}.{m.group(2)}")


def train_dtype(name: str) -> str:
    """bfloat16 on compute capability >= 8.0, else float16 (with loss scaling), as docs/gpu.md."""
    return "bfloat16" if target_capability(name) >= 8.0 else "float16"


def prepare() -> None:
    """Environment for compiling on CPU for CUDA; call before JAX starts a backend. Raises
    CompileUnavailable when the CUDA plugin is missing."""
    import importlib.util

    if (
        importlib.util.find_spec("jax_plugins") is None
        or importlib.util.find_spec("jax_plugins.xla_cuda12") is None
    ):
        raise CompileUnavailable(
            "the CUDA plugin is not installed here: compile in an environment of its own, "
            "python -m venv .venv-gpu && .venv-gpu/bin/pip install -c constraints.txt "
            "-e '.[gpu-compile]'"
        )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # the plugin checks the local CUDA libraries' versions against a GPU driver there is none of
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


@functools.cache
def target_device(name: str):
    """A compile-only device of GPU ``name`` (one GPU)."""
    prepare()
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(
        name, "cuda", target_config=target_text(name), topology="1x1x1"
    )
    return topology.devices[0]


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def _placed(tree, sharding):
    import jax

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


@contextlib.contextmanager
def on_target(target: str):
    """Compile-only devices ready, and models built and traced inside as a process on
    ``target``'s GPU builds them (`fwi_jax.model.target.compiling_for` its compute capability)."""
    prepare()
    from fwi_jax.model.target import compiling_for

    with compiling_for(target_capability(target)):
        yield


def compile_train_step(cfg, batch: int, target: str) -> dict[str, Any]:
    """Compile ``cfg``'s real train step (``fwi_jax.train.make_train_step``, state donated) at
    global ``batch`` for GPU ``target``: {"peak_bytes", "compile_s"}."""
    with on_target(target):
        import jax
        from jax.sharding import SingleDeviceSharding

        from fwi_jax.train import abstract_train_step

        sharding = SingleDeviceSharding(target_device(target))
        step, state, data = abstract_train_step(cfg, batch, platform="cuda")
        t0 = time.perf_counter()
        compiled = (
            jax.jit(step, donate_argnums=0)
            .lower(_placed(state, sharding), _placed(data, sharding))
            .compile()
        )
    return {"peak_bytes": peak_bytes(compiled), "compile_s": time.perf_counter() - t0}


def compile_ensemble(cfg, members: int, batch: int, target: str) -> dict:
    """Compile the stacked-ensemble inference program (``fwi_jax.ensemble.ensemble_fn``: every
    member at once, flip TTA in the batch, as ``python -m fwi_jax.infer`` runs on a GPU)."""
    with on_target(target):
        import jax
        from jax.sharding import SingleDeviceSharding

        from fwi_jax.ensemble import Group, ensemble_fn
        from fwi_jax.model import abstract_model

        sharding = SingleDeviceSharding(target_device(target))
        graphdef, params = abstract_model(cfg, platform="cuda")
        stacked = jax.tree.map(lambda a: jax.ShapeDtypeStruct((members, *a.shape), a.dtype), params)
        group = Group(
            cfg=cfg,
            graphdef=graphdef,
            params=stacked,
            weights=jax.ShapeDtypeStruct((members,), "float32"),
            sources=[cfg.name] * members,
        )
        fn = ensemble_fn([group], tta=True, member_chunk=None, tta_in_batch=True)
        g = cfg.geometry
        x = jax.ShapeDtypeStruct((batch, 6, g.n_time, g.n_receivers), "float32")
        t0 = time.perf_counter()
        compiled = (
            jax.jit(fn)
            .lower(_placed((group.params,), sharding), _placed((group.weights,), sharding), x)
            .compile()
        )
    return {"peak_bytes": peak_bytes(compiled), "compile_s": time.perf_counter() - t0}


def fits(peak: int, target: str) -> bool:
    return peak <= HEADROOM * target_memory_bytes(target)


def largest_batch(cfg, target: str, limit: int = 64) -> dict[str, Any]:
    """The largest global batch whose train step fits ``target`` (``fits``): memory is affine in
    the batch, so two compiles (batch 1 and 2) predict it and one or two more confirm it.
    {"batch" (0: not even 1 fits), "peak_bytes" at that batch, "compiles"}."""
    p1 = compile_train_step(cfg, 1, target)["peak_bytes"]
    if not fits(p1, target):
        return {"batch": 0, "peak_bytes": p1, "compiles": 1}
    p2 = compile_train_step(cfg, 2, target)["peak_bytes"]
    per_sample = max(p2 - p1, 1)
    b = max(1, min(limit, int((HEADROOM * target_memory_bytes(target) - p1) // per_sample) + 1))
    compiles, found = 2, (1, p1)
    while True:  # confirm b; step down while it does not fit
        peak = compile_train_step(cfg, b, target)["peak_bytes"] if b > 2 else (p2 if b == 2 else p1)
        compiles += b > 2
        if fits(peak, target):
            found = (b, peak)
            break
        b -= 1
    return {"batch": found[0], "peak_bytes": found[1], "compiles": compiles}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fwi_jax.gpu_compile", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--config", default="base_s6", help="config name or path")
    ap.add_argument(
        "--targets", nargs="+", default=None, help="default: every file in gpu_targets/"
    )
    ap.add_argument("--batch", type=int, default=8, help="global batch of the train step")
    ap.add_argument("--remat", nargs="+", default=["none", "full"])
    ap.add_argument("--dtype", help="default: bfloat16 on compute capability >= 8.0, else float16")
    ap.add_argument("--largest-batch", action="store_true", help="find the largest batch that fits")
    ap.add_argument(
        "--ensemble", type=int, metavar="N", help="compile an N-member ensemble (flip TTA) instead"
    )
    ap.add_argument("--set", nargs="*", default=[], help="config overrides")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        prepare()
    except CompileUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from fwi_jax.config import load_config

    targets = a.targets or target_names()
    failed = 0
    print(
        "| config | target | dtype | remat | batch | peak GiB | card GiB | fits | compile s |\n"
        "|---|---|---|---|---:|---:|---:|---|---:|",
        flush=True,
    )
    for config in [a.config]:
        for target in targets:
            dtype = a.dtype or train_dtype(target)
            card = target_memory_bytes(target) / GIB
            for remat in [None] if a.ensemble else a.remat:
                extra = [f"model.dtype={dtype}"] + ([f"model.remat={remat}"] if remat else [])
                cfg = load_config(config, [*a.set, *extra])
                t0 = time.perf_counter()
                try:
                    if a.ensemble:
                        rec = compile_ensemble(cfg, a.ensemble, a.batch, target)
                        batch = a.batch
                    elif a.largest_batch:
                        rec = largest_batch(cfg, target)
                        batch = rec["batch"]
                    else:
                        rec = compile_train_step(cfg, a.batch, target)
                        batch = a.batch
                except Exception as e:  # noqa: BLE001 - the compiler's refusal is the finding
                    msg = str(e).splitlines()[0][:200] if str(e) else ""
                    print(
                        f"| {config} | {target} | {dtype} | {remat} | | {type(e).__name__}: "
                        f"{msg} | | | |",
                        flush=True,
                    )
                    print(f"error: {config} for {target}: {type(e).__name__}: {e}", file=sys.stderr)
                    failed += 1
                    continue
                peak = rec["peak_bytes"] / GIB
                what = f"ensemble x{a.ensemble}" if a.ensemble else remat
                print(
                    f"| {config} | {target} | {dtype} | {what} | {batch} | {peak:.1f} | "
                    f"{card:.0f} | {'yes' if fits(rec['peak_bytes'], target) else 'no'} | "
                    f"{time.perf_counter() - t0:.0f} |",
                    flush=True,
                )
    return 1 if failed else 0  # a program the GPU compiler refused is a failure


if __name__ == "__main__":
    sys.exit(main())
