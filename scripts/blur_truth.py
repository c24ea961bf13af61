"""Blurred true models as a submission: starting models for refinement experiments.

    python scripts/blur_truth.py --data DIR --out START.npz [--sigma 20] [--ids A,B,...]

Each sample folder of DIR with a ``vp_model.npy`` gives its true model smoothed by a Gaussian of
``--sigma`` metres (cells of 1 m, both axes; edges reflected), written as a competition-format
submission. Refining such starts (``python -m fwi_jax.refine``) measures what the physics can
recover when the start lacks the sharp layers, without a network in the loop (docs/physics.md).
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
from scipy.ndimage import gaussian_filter

from fwi_jax.data import io


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder of sample folders with vp_model.npy")
    ap.add_argument("--out", required=True, help="submission .npz to write")
    ap.add_argument("--sigma", type=float, default=20.0, help="Gaussian width, metres (default 20)")
    ap.add_argument("--ids", help="comma-separated sample ids (default: every sample)")
    a = ap.parse_args()
    root = pathlib.Path(a.data).expanduser()
    ids = a.ids.split(",") if a.ids else io.list_samples(root)
    preds = {}
    for sid in ids:
        v = io._load_array(root / sid / io.VELOCITY_FILE, io.VELOCITY_FILE_SHAPE)
        preds[sid] = gaussian_filter(v.astype(np.float64), a.sigma, mode="reflect").astype(
            np.float32
        )
    io.write_submission(pathlib.Path(a.out).expanduser(), preds)
    print(f"wrote {len(preds)} blurred models (sigma {a.sigma:g} m) to {a.out}")


if __name__ == "__main__":
    main()
