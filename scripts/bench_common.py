"""Helpers the benchmark and profiling scripts share: the import paths (the repository, and tests/
for the PyTorch reference model), a random batch, our train step ready to compile, the reference's
loss in PyTorch, XLA's cost and memory figures of a compiled program, and this machine's
dense-matmul roofline.

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


def our_train_step(cfg, batch: int, seed: int = 0):
    """Our real train step for ``cfg`` (``fwi_jax.train.make_train_step``: forward, the config's
    loss, backward, the config's optimiser, EMA, loss-scale bookkeeping; the EMA already active so
    its work counts) -> (step, state, batch dict of device arrays, parameter count). ``step`` is
    not jitted: ``jax.jit(step, donate_argnums=0)`` as training runs it."""
    import jax.numpy as jnp

    from fwi_jax.model import count_params, create_model
    from fwi_jax.optim import make_optimizer
    from fwi_jax.train import create_train_state, make_train_step

    graphdef, params = create_model(cfg, seed=seed)
    n_params = count_params(params)
    tx, schedule = make_optimizer(cfg, total_steps=1000)
    step = make_train_step(cfg, graphdef, tx, schedule, ema_start_step=0)
    state = create_train_state(cfg, params, tx)
    x, v = make_batch(cfg, batch, seed)
    return step, state, {"x": jnp.asarray(x), "v": jnp.asarray(v)}, n_params


def train_step_flops(cfg, batch: int) -> float:
    """XLA's FLOPs of one train step of ``cfg`` at ``batch`` with ``xla`` attention and no remat:
    the model's FLOPs per step, whatever attention and remat a run uses (cuDNN's attention is a
    custom call XLA counts as 0, a ``lax.scan`` body is counted once, remat adds recomputation).
    From the lowered program (shapes only: nothing allocated, nothing compiled)."""
    import jax

    from fwi_jax.train import abstract_train_step

    cfg = cfg.replace(**{"model.attention": "xla", "model.remat": "none"})
    step, state, data = abstract_train_step(cfg, batch)
    cost = jax.jit(step).lower(state, data).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost["flops"])


def torch_loss(cfg):
    """The reference's loss in PyTorch for ``cfg.train.loss`` (``fwi_jax.loss.base_loss`` /
    ``hard_mining_loss``): ``loss(pred, v)``, the depth weights on ``v``'s device."""
    import torch

    def loss(pred, vel):
        w = torch.linspace(1.0, 0.25, vel.shape[1], device=vel.device)[None, :, None]
        e = (pred.float() - vel).abs() / vel
        if cfg.train.loss == "hard":
            h = torch.exp(e.detach())
            h = h * (h.shape[1] * h.shape[2]) / h.sum(dim=(1, 2), keepdim=True)
            return (e * w * h).mean()
        return (e * w).mean()

    return loss


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
    from fwi_jax.gpu_compile import peak_bytes

    return peak_bytes(compiled) / GIB


def matmul_roofline(n: int = 2048, reps: int = 5, dtype: str = "float32") -> float:
    """Dense ``dtype`` matmul FLOP/s of this machine's default JAX device (median of ``reps``;
    JAX's default matmul precision)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
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


# One thread per core, each running 12 independent AVX-512 FMA chains (two FMA units of 4-cycle
# latency stay busy): its float32 rate over 64 FLOP per cycle and core is the clock the cores
# hold under a full vector load, turbo included (/proc/cpuinfo shows the base clock in a VM).
_CLOCK_PROBE = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>
int main() {
  const int threads = std::thread::hardware_concurrency();
  const long iters = 20000000L;
  std::vector<float> out(threads);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] {
    __m512 a[12];
    const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
    for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(1.0f + i);
    for (long k = 0; k < iters; ++k)
      for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
    float s = 0;
    for (int i = 0; i < 12; ++i) s += _mm512_reduce_add_ps(a[i]);
    out[t] = s;
  });
  for (auto& th : pool) th.join();
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%d %.4f %g\n", threads, 2.0 * 16 * 12 * iters / sec / 64 / 1e9, out[0]);
}
"""


def cpu_clock_ghz() -> float:
    """The cores' clock under a full AVX-512 load, measured (`_CLOCK_PROBE`, built with the
    kernels' compiler; about 0.2 s)."""
    import subprocess
    import tempfile

    from fwi_jax.model.cpu_kernel import find_compiler

    with tempfile.TemporaryDirectory() as tmp:
        src, exe = pathlib.Path(tmp) / "probe.cc", pathlib.Path(tmp) / "probe"
        src.write_text(_CLOCK_PROBE)
        cmd = [find_compiler(), "-O3", "-march=native", "-pthread", str(src), "-o", str(exe)]
        subprocess.run(cmd, check=True, capture_output=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return float(out.split()[1])


def cpu_peak(dtype: str) -> tuple[float, str]:
    """This CPU's peak dense FLOP/s for ``dtype`` products, and how it was reckoned: cores x the
    measured clock (`cpu_clock_ghz`) x FLOP per cycle per core of the widest unit the CPU flags
    name: AMX (one 16x16x32 bfloat16 tile product, 16,384 FLOP, every 16 cycles: 1,024),
    AVX-512 BF16 (two 512-bit units of 32 bfloat16 products: 128), AVX-512 (two 512-bit FMA
    units: 64 float32 FLOP), AVX2 (two 256-bit FMA units: 32)."""
    import os

    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    flags = set(next(ln for ln in lines if ln.startswith("flags")).split(":")[1].split())
    if dtype == "bfloat16" and "amx_bf16" in flags:
        per_cycle, unit = 1024, "AMX bfloat16 tiles"
    elif dtype == "bfloat16" and "avx512_bf16" in flags:
        per_cycle, unit = 128, "AVX-512 BF16 dot products"
    elif "avx512f" in flags:
        per_cycle, unit = 64, "AVX-512 float32 FMA"
    else:
        per_cycle, unit = 32, "AVX2 float32 FMA"
    cores = os.cpu_count() or 1
    ghz = (
        cpu_clock_ghz()
        if "avx512f" in flags
        else float(next(ln for ln in lines if ln.startswith("cpu MHz")).split(":")[1]) / 1e3
    )
    peak = cores * ghz * 1e9 * per_cycle
    return peak, f"{cores} cores x {ghz:.2f} GHz x {per_cycle} FLOP/cycle ({unit})"


def forward_flops(cfg) -> float:
    """FLOPs of one more sample's forward pass of ``cfg``'s model, as inference runs it (the zero
    channel computed once per member, `model.constant_channel_once`): XLA's cost analysis of the
    program at batch 2 less batch 1, with dense layers and attention on XLA (it counts no custom
    call), float32."""
    import jax
    import jax.numpy as jnp

    from fwi_jax.model import abstract_model, apply_model

    cfg = cfg.replace(**{"model.dense": "xla", "model.attention": "xla", "model.dtype": "float32"})
    graphdef, params = abstract_model(cfg)
    g = cfg.geometry
    fn = jax.jit(lambda p, x: apply_model(graphdef, p, x))
    flops = [
        compiled_flops(
            fn.lower(
                params, jax.ShapeDtypeStruct((b, 6, g.n_time, g.n_receivers), jnp.float32)
            ).compile()
        )
        for b in (1, 2)
    ]
    return flops[1] - flops[0]
