"""Speed and accuracy of the synthetic-data solver at the competition geometry (SPEC §6).

Prints:
  1. cell-updates/s of the propagator at 8th and 4th order (5 shots over the padded 1 m grid,
     ``--steps`` time steps, compile excluded);
  2. seconds per competition-format sample (5 shots x 10,001 samples x 31 receivers) in the
     "fast" mode (mean over ``--samples`` geology models, after a warm-up call) and "full" mode;
  3. the fast mode's error against the full mode on the same models: relative L2 over each
     whole gather, and the same after muting the first 0.25 s around the direct wave.

  .venv/bin/python scripts/bench_synth.py [--steps 1000] [--samples 4] [--full-samples 1] [--cpu-devices 2]

On a CPU, XLA runs each model's stencil on one thread: with the default single device every
figure is one core's; ``--cpu-devices 2`` runs one model per core and gives the 2-core figures.

Timings on a shared machine are noisy; run it alone for figures worth quoting.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--cpu-devices" in sys.argv:  # must reach XLA before JAX starts its CPU backend
    n_dev = sys.argv[sys.argv.index("--cpu-devices") + 1]
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n_dev}"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fwi_jax import synth  # noqa: E402
from fwi_jax.synth import wave as W  # noqa: E402


def cell_updates(order: int, steps: int) -> float:
    mode = W.Mode(dx=1.0, dt=1e-4, order=order, pml=W.MODES["full"].pml)
    v = np.stack([synth.sample_model(0, i)[1] for i in range(jax.device_count())])  # one model per device
    kw = dict(mode=mode, out_nt=steps)
    W.simulate(v, **kw)  # compile
    t0 = time.perf_counter()
    W.simulate(v, **kw)
    el = time.perf_counter() - t0
    r = order // 2
    nx, nz = (s + 2 * mode.pml - 2 * r for s in v.shape[1:])  # cells updated each step
    return len(v) * 5 * nx * nz * steps / el


def per_sample(mode: str, models: np.ndarray) -> tuple[float, np.ndarray]:
    W.simulate(models[:1], mode=mode, amplitude=synth.DATA_AMPLITUDE)  # compile
    t0 = time.perf_counter()
    out = W.simulate(models, mode=mode, amplitude=synth.DATA_AMPLITUDE)
    return (time.perf_counter() - t0) / len(models), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--cpu-devices", type=int, default=1, help="JAX host devices; >1 runs models on several cores")
    p.add_argument("--full-samples", type=int, default=1, help="0 skips the full mode (about a minute per sample on 2 cores)")
    a = p.parse_args()
    print(f"devices: {jax.devices()}")
    for order in (8, 4):
        print(f"order {order}: {cell_updates(order, a.steps) / 1e9:.3f} G cell-updates/s")
    models = np.stack([synth.sample_model(1, i)[1] for i in range(max(a.samples, a.full_samples))])
    fast_s, fast = per_sample("fast", models[: a.samples])
    print(f"fast mode: {fast_s:.2f} s per sample ({a.samples} samples)")
    if a.full_samples:
        full_s, full = per_sample("full", models[: a.full_samples])
        print(f"full mode: {full_s:.2f} s per sample ({a.full_samples} samples)")
        f = fast[: a.full_samples].astype(np.float64)
        g = full.astype(np.float64)
        err = np.linalg.norm(f - g, axis=(2, 3)) / np.linalg.norm(g, axis=(2, 3))
        m = slice(2500, None)  # t >= 0.25 s: reflections only (direct wave and its tail muted)
        err_late = np.linalg.norm(f[:, :, m] - g[:, :, m], axis=(2, 3)) / np.linalg.norm(g[:, :, m], axis=(2, 3))
        print(f"fast vs full, relative L2 per gather: mean {err.mean():.4f}, max {err.max():.4f}")
        print(f"fast vs full, relative L2 per gather after 0.25 s: mean {err_late.mean():.4f}, max {err_late.max():.4f}")


if __name__ == "__main__":
    main()
