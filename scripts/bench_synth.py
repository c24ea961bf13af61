"""Speed and accuracy of the synthetic-data solver at the competition geometry (reference §6).

For each solver configuration (``--config``, keyword arguments of ``wave.simulate`` such as
``unroll=2`` or ``shot_batch=5``; default: the solver's defaults) and each host-device count
(``--cpu-devices 1,2``, one subprocess per count because XLA reads the count when it starts):
  1. cell-updates/s of the propagator at 8th and 4th order (one model per device, 5 shots over
     the padded 1 m grid, ``--steps`` time steps, compile excluded);
  2. seconds per competition-format sample (5 shots x 10,001 samples x 31 receivers) in the
     "fast" mode (mean over ``--samples`` geology models, after a warm-up call) and, with
     ``--full-samples N``, the "full" mode;
  3. with the full mode, the fast mode's error against it on the same models: relative L2 over
     each whole gather, and the same after muting the first 0.25 s around the direct wave.
Then a Markdown table of all of them.

  .venv/bin/python scripts/bench_synth.py [--cpu-devices 1,2] [--config unroll=1 --config unroll=2]
      [--steps 1000] [--samples 4] [--full-samples 0]

``--vs-devito N`` instead compares, in one run on ``--threads`` cores (default 1: plain C for
devito, one XLA host device for JAX; more: devito's OpenMP and as many host devices), seconds per
competition-format sample of devito itself (the recipe in tests/devito_reference.py, one sample of
5 shots after a warm-up shot that compiles its C), this package's "devito" profile (N samples,
compile excluded) and the cpml8 fast mode, on geology models scaled to a top speed of
4.1 km/s (devito's step 0.149 ms, inside the challenge's 0.14-0.155 ms), plus the profile's
correlation and amplitude against devito per shot on the shared sample:

  .venv/bin/python scripts/bench_synth.py --vs-devito 2 [--threads 1]

OpenMP threads wait for each other at every time step: on a machine that other jobs load, keep
``--threads 1`` (devito's figure would otherwise measure the waiting).

On a CPU, XLA runs each model's stencil on one thread: with one device every figure is one
core's; ``--cpu-devices 2`` runs one model per core and gives the 2-core figures.

Timings on a shared machine are noisy; run it alone for figures worth quoting (the table also
gives the CPU seconds the process used, which other load inflates less than wall time).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time


def parse_config(text: str) -> dict:
    """'unroll=2,shot_batch=5' -> {'unroll': 2, 'shot_batch': 5}; '' -> {}."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, val = item.partition("=")
        out[key.strip()] = ast.literal_eval(val.strip())
    return out


def run_one(a, n_dev: int) -> list[dict]:
    """Every configuration on ``n_dev`` host devices, in this process (JAX not started yet)."""
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n_dev}"
    )
    import jax
    import numpy as np

    from fwi_jax import synth
    from fwi_jax.synth import wave as W

    assert jax.device_count() == n_dev, jax.devices()

    def timed(fn):
        fn()  # compile
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        return time.perf_counter() - t0, time.process_time() - c0, out

    def cell_updates(order: int, kw: dict) -> tuple[float, float]:
        mode = W.Mode(dx=1.0, dt=1e-4, order=order, pml=W.MODES["full"].pml)
        v = np.stack([synth.sample_model(0, i)[1] for i in range(n_dev)])  # one model per device
        wall, cpu, _ = timed(lambda: W.simulate(v, mode=mode, out_nt=a.steps, **kw))
        r = order // 2
        nx, nz = (s + 2 * mode.pml - 2 * r for s in v.shape[1:])  # cells updated each step
        cells = len(v) * 5 * nx * nz * a.steps
        return cells / wall, cells / cpu * n_dev  # the CPU figure: as if each device had its core

    n_models = max(a.samples, a.full_samples, n_dev)
    models = np.stack([synth.sample_model(1, i)[1] for i in range(n_models)])
    rows = []
    for text in a.config:
        kw = parse_config(text)
        row = {"config": text or "defaults", "devices": n_dev}
        for order in (8, 4):
            row[f"gcu{order}"], row[f"gcu{order}_cpu"] = (x / 1e9 for x in cell_updates(order, kw))
            print(
                f"[{n_dev} dev, {row['config']}] order {order}: {row[f'gcu{order}']:.3f} G "
                "cell-updates/s",
                flush=True,
            )
        n_fast = max(a.samples, n_dev)
        wall, _, fast = timed(
            lambda n=n_fast, kw=kw: W.simulate(
                models[:n], mode="fast", amplitude=synth.DATA_AMPLITUDE, **kw
            )
        )
        row["fast_s"] = wall / n_fast
        print(
            f"[{n_dev} dev, {row['config']}] fast mode: {row['fast_s']:.2f} s per sample "
            f"({n_fast} samples)",
            flush=True,
        )
        if a.full_samples:
            n_full = a.full_samples
            t0 = time.perf_counter()
            full = W.simulate(models[:n_full], mode="full", amplitude=synth.DATA_AMPLITUDE, **kw)
            row["full_s"] = (time.perf_counter() - t0) / n_full  # includes one compile
            f = fast[:n_full].astype(np.float64)
            g = full.astype(np.float64)
            err = np.linalg.norm(f - g, axis=(2, 3)) / np.linalg.norm(g, axis=(2, 3))
            m = slice(2500, None)  # t >= 0.25 s: reflections only (direct wave and its tail muted)
            late = np.linalg.norm(f[:, :, m] - g[:, :, m], axis=(2, 3)) / np.linalg.norm(
                g[:, :, m], axis=(2, 3)
            )
            row.update(
                err_mean=err.mean(), err_max=err.max(), late_mean=late.mean(), late_max=late.max()
            )
            print(
                f"[{n_dev} dev, {row['config']}] full mode: {row['full_s']:.1f} s per sample "
                "(incl. compile); "
                f"fast vs full rel. L2 per gather mean {err.mean():.4f} max {err.max():.4f}, "
                f"after 0.25 s mean {late.mean():.4f} max {late.max():.4f}",
                flush=True,
            )
        rows.append(row)
    return rows


def run_vs_devito(a) -> None:
    """Devito vs the devito profile vs the fast mode, same run, every core (see module doc)."""
    n_cores = a.threads
    flag = f"--xla_force_host_platform_device_count={n_cores}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(repo, "tests"))
    import devito_reference

    devito_reference.configure(threads=n_cores)
    import numpy as np

    from fwi_jax import synth
    from fwi_jax.synth import profiles as P
    from fwi_jax.synth import wave as W

    def load() -> str:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())

    n = max(a.vs_devito, 1)
    models = np.stack([synth.sample_model(2, i)[1] for i in range(n)])
    models = models * (4.1 / models.max(axis=(1, 2), keepdims=True))
    print(f"load average at start: {load()} ({os.cpu_count()} cores; {n_cores} used)", flush=True)
    P.simulate(models[:1], profile="devito")  # compile
    t0 = time.perf_counter()
    ours = P.simulate(models, profile="devito")
    ours_s = (time.perf_counter() - t0) / n
    print(f"devito profile: {ours_s:.1f} s per sample ({n} samples)", flush=True)
    P.simulate(models[:1], profile="cpml8", mode="fast")
    t0 = time.perf_counter()
    P.simulate(models, profile="cpml8", mode="fast")
    fast_s = (time.perf_counter() - t0) / n
    print(f"cpml8 fast: {fast_s:.2f} s per sample", flush=True)
    v = models[0]
    devito_reference.shot(v, W.SOURCE_X[0])  # warm-up: compiles devito's operator
    t0 = time.perf_counter()
    ref = np.stack([devito_reference.shot(v, sx)[0] for sx in W.SOURCE_X])
    devito_s = time.perf_counter() - t0
    print(f"devito: {devito_s:.1f} s per sample (5 shots, {n_cores} thread(s))", flush=True)
    ref = P.span_resample(ref)
    stats = []
    for k in range(len(W.SOURCE_X)):
        x, y = ours[0, k].astype(np.float64).ravel(), ref[k].astype(np.float64).ravel()
        stats.append((x @ y / np.sqrt((x @ x) * (y @ y)), np.linalg.norm(x) / np.linalg.norm(y)))
    print(f"load average at end: {load()}")
    print()
    print("| generator | s per sample | vs devito |")
    print("|---|---|---|")
    print(f"| devito (recipe, {n_cores} thread(s)) | {devito_s:.1f} | 1x |")
    print(f"| devito profile ({n_cores} host devices) | {ours_s:.1f} | {devito_s / ours_s:.1f}x |")
    print(f"| cpml8 fast | {fast_s:.2f} | {devito_s / fast_s:.0f}x |")
    print()
    print(
        "devito profile vs devito per shot: correlation "
        + " ".join(f"{c:.5f}" for c, _ in stats)
        + "; amplitude "
        + " ".join(f"{r:.4f}" for _, r in stats)
    )


def table(rows: list[dict]) -> str:
    head = (
        "| config | devices | G cell-updates/s, order 8 | order 8, per CPU-s x devices | order 4 "
        "| fast s/sample | full s/sample | fast vs full L2 mean / max |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        err = f"{r['err_mean']:.3f} / {r['err_max']:.3f}" if "err_mean" in r else "-"
        full = f"{r['full_s']:.1f}" if "full_s" in r else "-"
        lines.append(
            f"| {r['config']} | {r['devices']} | {r['gcu8']:.3f} | {r['gcu8_cpu']:.3f} | "
            f"{r['gcu4']:.3f} "
            f"| {r['fast_s']:.2f} | {full} | {err} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument(
        "--cpu-devices",
        default="1,2",
        help="comma-separated host-device counts, one subprocess each",
    )
    p.add_argument(
        "--config",
        action="append",
        help="repeatable; wave.simulate keywords, e.g. 'unroll=2,shot_batch=5'",
    )
    p.add_argument(
        "--full-samples",
        type=int,
        default=0,
        help="full-mode samples (about half a minute each on 2 cores)",
    )
    p.add_argument(
        "--vs-devito",
        type=int,
        default=0,
        metavar="N",
        help="compare with devito itself instead (N samples of the devito profile)",
    )
    p.add_argument("--threads", type=int, default=1, help="--vs-devito: cores for each side")
    # used by the per-device-count subprocesses
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.vs_devito:
        run_vs_devito(a)
        return
    a.config = a.config or [""]
    counts = [int(c) for c in str(a.cpu_devices).split(",")]
    if a.json_out:  # child: one device count
        rows = run_one(a, counts[0])
        with open(a.json_out, "w") as fh:
            json.dump(rows, fh)
        return
    rows = []
    for n in counts:
        out = f"/tmp/bench_synth_{os.getpid()}_{n}.json"
        argv = [
            sys.executable,
            __file__,
            "--cpu-devices",
            str(n),
            "--steps",
            str(a.steps),
            "--samples",
            str(a.samples),
            "--full-samples",
            str(a.full_samples),
            "--json-out",
            out,
        ]
        for c in a.config:
            argv += ["--config", c]
        subprocess.run(argv, check=True)
        with open(out) as fh:
            rows += json.load(fh)
        os.remove(out)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
