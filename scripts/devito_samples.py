"""Samples made by an independent propagator: devito itself, on the velocity models of a dataset.

    python scripts/devito_samples.py --data DIR --out OUT [--ids A,B,...] [--n 4] [--threads 2]

For each chosen sample folder of DIR, runs the public devito recipe (tests/devito_reference.py:
2nd order, 1 m grid, devito's damping layer; devito is a test dependency) for the five shots of
its ``vp_model.npy``, maps the traces onto the 10,001 output samples as the recipe does, and
writes a competition-format folder OUT/<id> (the five gathers and the same ``vp_model.npy``).
Used to measure the misfit and the refinement on data our solver did not make (docs/physics.md).
Cost: 41-61 s per sample with --threads 2 (OpenMP; 2-core EPYC, 2026-12-02), about 274 s on one
core in plain C (docs/performance.md §6); folders already in OUT are kept.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder of sample folders with vp_model.npy")
    ap.add_argument("--out", required=True, help="folder for the devito-made samples")
    ap.add_argument("--ids", help="comma-separated sample ids (default: the first --n)")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    import numpy as np

    import devito_reference

    devito_reference.configure(threads=a.threads)
    from tqdm.auto import tqdm

    from fwi_jax.data import io
    from fwi_jax.synth import _write_sample, is_complete
    from fwi_jax.synth import profiles as P
    from fwi_jax.synth import wave as W

    root = pathlib.Path(a.data).expanduser()
    ids = a.ids.split(",") if a.ids else sorted(p.name for p in root.iterdir() if p.is_dir())[: a.n]
    out = pathlib.Path(a.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for sid in tqdm(ids, desc="devito", unit="sample"):
        if is_complete(out / sid):
            continue
        vfile = root / sid / io.VELOCITY_FILE
        if not vfile.is_file():
            raise SystemExit(f"{vfile}: no velocity model to simulate")
        v = io._load_array(vfile, io.VELOCITY_FILE_SHAPE)
        t0 = time.perf_counter()
        shots = [devito_reference.shot(v, sx)[0] for sx in W.SOURCE_X]
        gathers = P.span_resample(np.stack(shots))
        _write_sample(out, sid, gathers, v)
        tqdm.write(f"{sid}: {time.perf_counter() - t0:.0f} s")
    print(f"wrote {len(ids)} samples to {out}")


if __name__ == "__main__":
    main()
