"""Calibration of a generator profile against a dataset, and mixed samples made from it.

The datasets here are made with the cpml8 profile's fast mode (under a second per sample) and a
known polarity, scale and shift, so calibration has an exact answer; the devito profile takes
the same code path with another simulator (tests/test_synth_devito.py checks that simulator)."""

import json

import numpy as np
import pytest

from fwi_jax.data import io
from fwi_jax.data import split as S
from fwi_jax.synth import __main__ as cli
from fwi_jax.synth import _write_sample, profiles, sample_model
from fwi_jax.synth.calibrate import (
    CALIBRATION_FILE,
    CalibrationError,
    calibrate,
    shift_time,
)
from fwi_jax.synth.mix import mixed_model, source_ids

POLARITY, SCALE, SHIFT = -1, 3.7, 7  # the "real" data = -3.7 x the simulation, 0.7 ms later


@pytest.fixture(scope="module")
def simulated():
    models = np.stack([sample_model(5, i)[1] for i in range(2)])
    return models, profiles.simulate(models, profile="cpml8", mode="fast")


def write_dataset(root, models, gathers, prefix="real"):
    root.mkdir(parents=True, exist_ok=True)
    for i, (v, g) in enumerate(zip(models, gathers)):
        _write_sample(root, f"{prefix}_{i:03d}", g, v)
    return root


@pytest.fixture(scope="module")
def calibrated(simulated, tmp_path_factory):
    models, sims = simulated
    root = write_dataset(
        tmp_path_factory.mktemp("data"), models, POLARITY * SCALE * shift_time(sims, SHIFT)
    )
    cal = calibrate(root, samples=2, profile="cpml8", mode="fast", progress=False, log=lambda *_: 0)
    return root, cal


def test_calibration_recovers_polarity_scale_and_shift(calibrated):
    root, cal = calibrated
    assert cal.polarity == POLARITY
    assert abs(cal.scale / SCALE - 1) <= 0.01, cal.scale
    assert abs(cal.shift - SHIFT) <= 1, cal.shift
    assert all(c >= 0.999 for cs in cal.correlation.values() for c in cs), cal.correlation
    saved = json.loads((root / CALIBRATION_FILE).read_text())
    assert (saved["shift"], saved["polarity"], saved["profile"]) == (cal.shift, POLARITY, "cpml8")


def test_calibration_refuses_another_geometry(simulated, tmp_path, capsys):
    models, sims = simulated
    # receivers in the opposite order: every shot's moveout is mirrored
    root = write_dataset(tmp_path / "other", models, sims[..., ::-1])
    with pytest.raises(CalibrationError, match=r"real_000 receiver_data_src_1\.npy 0\.\d+"):
        calibrate(root, samples=2, profile="cpml8", mode="fast", progress=False, log=lambda *_: 0)
    assert not (root / CALIBRATION_FILE).exists()
    rc = cli.main(
        [
            "calibrate",
            "--data",
            str(root),
            "--profile",
            "cpml8",
            "--cpu-devices",
            "1",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "below 0.95" in err[0]


def test_mixed_samples_are_competition_format_within_range_and_never_validated(
    calibrated, tmp_path, capsys
):
    root, _ = calibrated
    out = tmp_path / "mixed"
    rc = cli.main(
        [
            "--mix-from",
            str(root),
            "--n",
            "2",
            "--out",
            str(out),
            "--cpu-devices",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    ids = io.list_samples(out)
    assert ids == ["mix_s0_000000", "mix_s0_000001"]
    assert io.check_dataset(out, ids, require_velocity=True) == []  # competition format
    sources = {i: np.load(root / i / io.VELOCITY_FILE) for i in source_ids(root)}
    lo = min(v.min() for v in sources.values())
    hi = max(v.max() for v in sources.values())
    for k, sid in enumerate(ids):
        v = np.load(out / sid / io.VELOCITY_FILE)
        v_again, how = mixed_model(0, k, root, source_ids(root))
        np.testing.assert_array_equal(v, v_again)  # reproducible from (seed, index)
        pair = [sources[how["first"]], sources[how["second"]]]
        assert min(p.min() for p in pair) - 1e-6 <= v.min()
        assert v.max() <= max(p.max() for p in pair) + 1e-6
        # gathers: the calibrated simulation of the mixed model
        g = np.load(out / sid / io.SHOT_FILES[2])
        assert g.shape == (10001, 31) and g.dtype == np.float32 and np.abs(g).max() > 0
    # geology partners are clipped into the dataset's range
    v, how = mixed_model(
        1, 0, root, source_ids(root), families=("salt",), geology_share=1.0, v_range=(lo, hi)
    )
    assert how["second"] == "geology:salt" and lo - 1e-6 <= v.min() and v.max() <= hi + 1e-6

    # split: as the extra release, and even inside the first release's folder, never validated
    for i in ids:
        (root / i).symlink_to(out / i)
    train, val = S.reference_split([f"r{i:02d}" for i in range(10)] + ids)
    assert set(ids) <= set(train) and not set(ids) & set(val)
    assert S.reference_split([f"r{i:02d}" for i in range(10)])[1] == val  # real split unchanged
    from fwi_jax.data.__main__ import main as data_main

    real = tmp_path / "real.txt"
    S.write_id_list(real, [f"r{i:02d}" for i in range(10)])
    argv = ["split", "--first", str(real), "--extra", str(out), "--out", str(tmp_path / "a")]
    assert data_main(argv) == 0
    first = tmp_path / "first.txt"
    S.write_id_list(first, [f"r{i:02d}" for i in range(10)] + ids)
    assert data_main(["split", "--first", str(first), "--out", str(tmp_path / "b")]) == 0
    for d in ("a", "b"):
        assert set(ids) <= set(S.read_id_list(tmp_path / d / "train_f0.txt"))
        assert S.read_id_list(tmp_path / d / "val_f0.txt") == val
    with pytest.raises(ValueError, match="mix_s0_000000"):
        S.check_no_training_only(["r00", "mix_s0_000000"], "val.txt")


def test_mixing_needs_a_calibration(tmp_path, simulated, capsys):
    models, sims = simulated
    root = write_dataset(tmp_path / "data", models, sims)
    rc = cli.main(
        [
            "--mix-from",
            str(root),
            "--n",
            "1",
            "--out",
            str(tmp_path / "o"),
            "--cpu-devices",
            "1",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and CALIBRATION_FILE in err and "calibrate --data" in err


def test_training_keeps_mixed_samples_out_of_validation(tmp_path):
    from fwi_jax.config import Config
    from fwi_jax.train import TrainError, resolve_data

    mixed = ["mix_s0_000000", "mix_s0_000001"]
    for i in [f"r{i:02d}" for i in range(10)] + mixed:
        (tmp_path / i).mkdir()
    cfg = Config().replace(**{"data.root": str(tmp_path)})
    data = resolve_data(cfg, progress=False)  # no lists: the reference split of every sample
    assert set(mixed) <= set(data.train_ids) and not set(mixed) & set(data.val_ids)
    assert len(data.val_ids) == 2
    S.write_id_list(tmp_path / "train.txt", ["r01"])
    S.write_id_list(tmp_path / "val.txt", ["r00", "mix_s0_000001"])
    cfg = cfg.replace(
        **{
            "data.train_list": str(tmp_path / "train.txt"),
            "data.val_list": str(tmp_path / "val.txt"),
        }
    )
    with pytest.raises(TrainError, match=r"val\.txt: 1 mixed sample.*mix_s0_000001"):
        resolve_data(cfg, progress=False)
