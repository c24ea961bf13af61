"""New training samples from a dataset's own velocity models, simulated with its calibration.

Mixed model i of seed s (id ``mix_s{s}_{i:06d}``) is ``w·v₁ + (1 − w)·v₂`` with v₁, v₂ two of
the dataset's models (each flipped left-right with probability 1/2) and w uniform in [0, 1]
(the recipe a public winner used: thinkonward/challenges,
geoscience/speed-and-structure/MGöksu/2_data_gen.ipynb). With ``geology_share`` p > 0, v₂ is
instead, with probability p, a model of this package's geology families clipped to the
dataset's velocity range. Every velocity therefore stays within the source models' range. The
gathers are simulated with the calibrated profile (``calibrate``) and written in the
competition format; the ``mix_`` prefix keeps them out of every validation list
(``fwi_jax.data.split``).

CLI: ``python -m fwi_jax.synth --mix-from DIR --n N --out OUT [--calibration FILE]``.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from fwi_jax.data.split import TRAINING_ONLY_PREFIX
from fwi_jax.synth.calibrate import CALIBRATION_FILE, Calibration, CalibrationError


def mix_id(seed: int, index: int) -> str:
    return f"{TRAINING_ONLY_PREFIX}s{seed}_{index:06d}"


def source_ids(root: pathlib.Path) -> list[str]:
    """The dataset's samples with a velocity model, mixed ones excluded (sorted)."""
    from fwi_jax.data import io

    ids = [i for i in io.list_samples(root) if not i.startswith(TRAINING_ONLY_PREFIX)]
    ids = [i for i in ids if (root / i / io.VELOCITY_FILE).is_file()]
    if len(ids) < 2:
        raise CalibrationError(
            f"{root}: mixing needs at least 2 samples with {io.VELOCITY_FILE}, found {len(ids)}"
        )
    return ids


def mixed_model(
    seed: int,
    index: int,
    root: pathlib.Path,
    ids: list[str],
    *,
    families=(),
    geology_share: float = 0.0,
    v_range: tuple[float, float] | None = None,
) -> tuple[np.ndarray, dict]:
    """(velocity (300, 1259) km/s, how it was made) of mixed sample ``index``; depends only on
    (seed, index, ids, families, geology_share)."""
    from fwi_jax.data import io
    from fwi_jax.synth import geology

    rng = np.random.default_rng([seed, index])
    a, b = (int(k) for k in rng.integers(len(ids), size=2))
    flips = rng.random(2) < 0.5
    w = float(rng.random())
    use_geology = bool(families) and rng.random() < geology_share

    def load(k: int, flip: bool) -> np.ndarray:
        v = io._load_array(root / ids[k] / io.VELOCITY_FILE, io.VELOCITY_FILE_SHAPE)
        return v[::-1] if flip else v

    v1 = load(a, flips[0])
    if use_geology:
        family = geology.sample_family(rng, tuple(families))
        v2 = geology.velocity_model(rng, family)
        lo, hi = v_range if v_range else (float(v1.min()), float(v1.max()))
        v2 = np.clip(v2, lo, hi)
        second = f"geology:{family}"
    else:
        v2 = load(b, flips[1])
        second = ids[b]
    v = (w * v1 + (1.0 - w) * v2).astype(np.float32)
    return v, {"first": ids[a], "second": second, "weight": w, "flips": flips.tolist()}


def velocity_range(root: pathlib.Path, ids: list[str]) -> tuple[float, float]:
    from fwi_jax.data import io

    lo, hi = np.inf, -np.inf
    for i in ids:
        v = io._load_array(root / i / io.VELOCITY_FILE, io.VELOCITY_FILE_SHAPE)
        lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    return lo, hi


def make_mixed(
    mix_from: os.PathLike,
    out_dir: os.PathLike,
    n: int,
    *,
    seed: int = 0,
    calibration: os.PathLike | None = None,
    families=(),
    geology_share: float = 0.0,
    progress: bool = True,
    batch: int | None = None,
) -> list[str]:
    """Write mixed samples 0..n-1 of ``seed`` into ``out_dir`` (complete ones are skipped)."""
    from fwi_jax.data.io import DataError
    from fwi_jax.synth import geology, profiles, simulate_and_write

    root = pathlib.Path(mix_from).expanduser()
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= geology_share <= 1.0:
        raise ValueError(f"geology share must be in [0, 1], got {geology_share}")
    for f in families:
        if f not in geology.FAMILIES:
            raise ValueError(f"unknown velocity-model family {f!r}; choose from {geology.FAMILIES}")
    cal = Calibration.load(
        pathlib.Path(calibration).expanduser() if calibration else root / CALIBRATION_FILE
    )
    try:
        ids = source_ids(root)
        v_range = velocity_range(root, ids) if families and geology_share > 0 else None
    except DataError as e:
        raise CalibrationError(str(e)) from None

    def models_of(indices: list[int]) -> np.ndarray:
        try:
            return np.stack(
                [
                    mixed_model(
                        seed,
                        i,
                        root,
                        ids,
                        families=families,
                        geology_share=geology_share,
                        v_range=v_range,
                    )[0]
                    for i in indices
                ]
            )
        except DataError as e:
            raise CalibrationError(str(e)) from None

    def gathers_of(models: np.ndarray) -> np.ndarray:
        return cal.apply(profiles.simulate(models, profile=cal.profile, mode=cal.mode))

    out = pathlib.Path(out_dir).expanduser()
    new = [mix_id(seed, i) for i in range(n)]
    simulate_and_write(
        out,
        new,
        models_of,
        gathers_of,
        batch=batch,
        progress=progress,
        desc=f"mix {root.name} ({cal.profile})",
    )
    return new
