"""Calibration of a generator profile against a real dataset: polarity, amplitude and time shift.

``calibrate(data_dir)`` re-simulates a few samples from their own ``vp_model.npy`` with a
profile, fits one polarity, one positive scale and one whole-sample time shift (at the files'
0.1 ms) that map the simulated gathers onto the files, and reports the normalised correlation
per sample and shot after the fit. When any correlation is below ``min_correlation`` (0.95: the
data come from another geometry or generator) it raises ``CalibrationError`` naming the samples,
shots and figures. The result is a JSON file (``CALIBRATION_FILE`` in the dataset folder by
default) that mixing (``fwi_jax.synth.mix``) reads back and applies with ``apply``:

    data(t) ≈ polarity · scale · simulated(t − shift · 0.1 ms)

CLI: ``python -m fwi_jax.synth calibrate --data DIR [--samples K] [--profile devito]``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

from fwi_jax.storage import write_atomic

CALIBRATION_FILE = "synth_calibration.json"
MIN_CORRELATION = 0.95


class CalibrationError(ValueError):
    """The dataset cannot be calibrated (bad files, or a fit below the correlation bound)."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Map from a profile's gathers onto a dataset's: polarity · scale · delay of ``shift``."""

    profile: str
    mode: str = "fast"  # solver mode (cpml8 profile only)
    polarity: int = 1
    scale: float = 1.0
    shift: int = 0  # output samples (0.1 ms); > 0: the data are later than the simulation
    correlation: dict = dataclasses.field(default_factory=dict)  # sample id -> [per shot]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def load(cls, path: os.PathLike) -> Calibration:
        path = pathlib.Path(path)
        if not path.is_file():
            raise CalibrationError(
                f"{path}: no calibration file (make one with "
                f"python -m fwi_jax.synth calibrate --data {path.parent})"
            )
        try:
            raw = json.loads(path.read_text())
            cal = cls(**raw)
        except (json.JSONDecodeError, TypeError) as e:
            raise CalibrationError(f"{path}: not a calibration file ({e})") from None
        if cal.polarity not in (1, -1) or not cal.scale > 0:
            raise CalibrationError(
                f"{path}: polarity must be 1 or -1 and scale > 0, got "
                f"{cal.polarity} and {cal.scale}"
            )
        return cal

    def apply(self, gathers: np.ndarray) -> np.ndarray:
        """(..., nt, R) simulated -> calibrated, shifted along the time axis with zero fill."""
        gathers = np.asarray(gathers, np.float32)
        return (self.polarity * self.scale) * shift_time(gathers, self.shift)


def shift_time(x: np.ndarray, k: int) -> np.ndarray:
    """x delayed by k samples along axis -2 (k < 0: advanced), zeros shifted in."""
    out = np.zeros_like(x)
    n = x.shape[-2]
    if k >= 0:
        out[..., k:, :] = x[..., : n - k, :]
    else:
        out[..., : n + k, :] = x[..., -k:, :]
    return out


def best_lag(sim: np.ndarray, data: np.ndarray, max_shift: int) -> np.ndarray:
    """Cross-correlation Σ data(t)·sim(t − k) for k = −max_shift..max_shift, summed over every
    axis but the time axis -2. sim, data: (..., nt, R). Returns (2·max_shift + 1,) float64."""
    nt = sim.shape[-2]
    n = 1 << int(np.ceil(np.log2(2 * nt)))
    fs = np.fft.rfft(sim.astype(np.float64), n, axis=-2)
    fd = np.fft.rfft(data.astype(np.float64), n, axis=-2)
    cross = np.fft.irfft(fd * np.conj(fs), n, axis=-2)  # index k: lag k (mod n)
    cross = cross.reshape(-1, n, cross.shape[-1]).sum(axis=(0, 2))
    lags = np.arange(-max_shift, max_shift + 1)
    return cross[lags % n]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    den = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / den) if den > 0 else 0.0


def fit(sim: np.ndarray, data: np.ndarray, max_shift: int = 1000) -> tuple[int, int, float]:
    """(shift, polarity, scale) mapping sim onto data: the lag of largest |cross-correlation|
    over every sample and shot, its sign, then the least-squares scale. sim, data: (S, 5, nt, R)."""
    xc = best_lag(sim, data, max_shift)
    i = int(np.argmax(np.abs(xc)))
    shift = i - max_shift
    polarity = 1 if xc[i] >= 0 else -1
    s = shift_time(sim, shift).astype(np.float64)
    scale = float(np.sum(s * data) / np.sum(s * s)) * polarity
    return shift, polarity, scale


def calibrate(
    data_dir: os.PathLike,
    *,
    samples: int = 3,
    ids=None,
    profile: str = "devito",
    mode: str = "fast",
    min_correlation: float = MIN_CORRELATION,
    max_shift: int = 1000,
    out: os.PathLike | None = None,
    progress: bool = True,
    log=print,
) -> Calibration:
    """Fit the profile to ``samples`` samples of ``data_dir`` (the first in sorted order, or
    ``ids``), print the correlation per sample and shot, write and return the calibration."""
    from tqdm.auto import tqdm

    from fwi_jax.data import io
    from fwi_jax.data.split import is_training_only
    from fwi_jax.synth import profiles

    profiles.check_profile(profile)
    root = pathlib.Path(data_dir).expanduser()
    try:
        if not ids:
            ids = [i for i in io.list_samples(root) if not is_training_only(i)][:samples]
        ids = list(ids)
    except io.DataError as e:
        raise CalibrationError(str(e)) from None
    if not ids:
        raise CalibrationError(f"{root}: no sample folders to calibrate against")
    sims, datas = [], []
    bar = tqdm(ids, desc=f"calibrate {profile} on {root}", unit="sample", disable=not progress)
    for sid in bar:
        folder = root / sid
        try:
            v = io._load_array(folder / io.VELOCITY_FILE, io.VELOCITY_FILE_SHAPE)
            d = np.stack(
                [io._load_array(folder / f, (io.N_TIME_RAW, io.N_RECEIVERS)) for f in io.SHOT_FILES]
            )
        except io.DataError as e:
            raise CalibrationError(str(e)) from None
        sims.append(profiles.simulate(v, profile=profile, mode=mode))
        datas.append(d)
    sim, data = np.stack(sims), np.stack(datas)
    shift, polarity, scale = fit(sim, data, max_shift)
    fitted = (polarity * scale) * shift_time(sim, shift)
    corr = {
        sid: [round(correlation(fitted[i, k], data[i, k]), 5) for k in range(data.shape[1])]
        for i, sid in enumerate(ids)
    }
    log(
        f"fit: polarity {polarity:+d}, scale {scale:.6g}, shift {shift:+d} samples "
        f"({shift * 0.1:+.1f} ms)"
    )
    for sid, c in corr.items():
        log(f"  {sid}: correlation per shot {' '.join(f'{x:.4f}' for x in c)}")
    bad = [(sid, k, x) for sid, c in corr.items() for k, x in enumerate(c) if x < min_correlation]
    if bad:
        shots = ", ".join(f"{sid} {io.SHOT_FILES[k]} {x:.3f}" for sid, k, x in bad[:10])
        raise CalibrationError(
            f"{root}: the {profile} profile does not fit these data ({len(bad)} shot(s) with "
            f"correlation below {min_correlation} after the best polarity, scale and shift: "
            f"{shots}); they come from another geometry or generator, so no calibration was "
            "written"
        )
    cal = Calibration(
        profile=profile, mode=mode, polarity=polarity, scale=scale, shift=shift, correlation=corr
    )
    path = pathlib.Path(out).expanduser() if out else root / CALIBRATION_FILE
    write_atomic(path, cal.to_json())
    log(f"wrote {path}")
    return cal
