"""Helpers the benchmark and profiling scripts share: the import paths (the repository, and tests/
for the PyTorch reference model), a random batch, XLA's cost and memory figures of a compiled
program, and this machine's dense-matmul roofline.

Run a script as ``python scripts/NAME.py``: Python puts scripts/ on the import path, so
``import bench_common`` finds this file, and importing it makes ``fwi_jax`` and
``torch_reference`` importable from a checkout that is not installed.
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
for _path in (REPO / "tests", REPO):  # torch_reference.py; fwi_jax from this checkout
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

GIB = 2.0**30


def make_batch(cfg, batch: int, seed: int = 0):
    """(x (batch, 6, T, R), v (batch, depth, x) uniform in [1.5, 4.5] km/s), float32 NumPy, for
    ``cfg``'s geometry. x as preprocessing makes it from random shots (channel 151 zeros), every
    second sample flipped as training's augmentation does."""
    import numpy as np

    from fwi_jax.preprocess import flip, shots_to_input

    g = cfg.geometry
    rng = np.random.default_rng(seed)
    shots = 1e-4 * rng.standard_normal((batch, 5, g.n_time + 1, g.n_receivers))
    x = shots_to_input(shots.astype(np.float32))
    x[1::2] = flip(x[1::2])
    x = np.ascontiguousarray(x)
    v = rng.uniform(1.5, 4.5, (batch, *g.out_shape)).astype(np.float32)
    return x, v


def compiled_flops(compiled) -> float | None:
    """XLA's FLOPs per call, plus those of fused_cpu's attention kernel (a custom call, which
    XLA counts as 0; `fwi_jax.model.fused_attention.kernel_flops`)."""
    from fwi_jax.model.fused_attention import kernel_flops

    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0)) + kernel_flops(compiled.as_text()) if cost else None


def compiled_memory_gib(compiled) -> float | None:
    """XLA's memory estimate of a compiled program: argument + output + temp - alias, GiB."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return total / GIB


def matmul_roofline(n: int = 2048, reps: int = 5) -> float:
    """Dense float32 matmul FLOP/s of this machine under XLA (median of ``reps``)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def fmt(x, spec, missing="-"):
    """``format(x, spec)``, or ``missing`` for None (a figure the backend does not report)."""
    return missing if x is None else format(x, spec)
