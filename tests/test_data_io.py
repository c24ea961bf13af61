"""Reading and validating competition-format sample folders; the atomic submission writer."""

import numpy as np
import pytest

from fwi_jax.data.io import (
    SHOT_FILES,
    VELOCITY_FILE,
    DataError,
    check_dataset,
    list_samples,
    read_sample,
    write_submission,
)
from fwi_jax.preprocess import SOURCE_POSITIONS


def write_sample(folder, seed=0, velocity=True):
    """A real-shaped sample: five (10001, 31) float32 shots, vp_model (300, 1259) float32."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    shots = {}
    for p, name in zip(SOURCE_POSITIONS, SHOT_FILES):
        shots[p] = rng.standard_normal((10001, 31), dtype=np.float32) * 1e-4
        np.save(folder / name, shots[p])
    vp = None
    if velocity:
        vp = rng.uniform(1.5, 4.5, (300, 1259)).astype(np.float32)
        np.save(folder / VELOCITY_FILE, vp)
    return shots, vp


def test_read_sample_layout(tmp_path):
    shots, vp = write_sample(tmp_path / "s0")
    x, v = read_sample(tmp_path / "s0")
    assert x.shape == (6, 10000, 31) and x.dtype == np.float32
    assert v.shape == (1259, 300) and v.dtype == np.float32
    np.testing.assert_array_equal(v, vp.T)
    # channel order (1, 75, 150, 151, 225, 300); 151 all zero; last sample dropped; x1e4
    for c, p in enumerate((1, 75, 150, None, 225, 300)):
        if p is None:
            assert not x[c].any()
        else:
            np.testing.assert_array_equal(x[c], shots[p][:-1] * np.float32(1e4))


def test_read_sample_without_velocity(tmp_path):
    write_sample(tmp_path / "t", velocity=False)
    x, v = read_sample(tmp_path / "t")
    assert x.shape == (6, 10000, 31) and v is None
    with pytest.raises(DataError, match="vp_model.npy: missing file"):
        read_sample(tmp_path / "t", require_velocity=True)


def _corrupt(folder, kind):
    """Break one file of a good sample in the way ``kind`` names; returns (file name, message
    regex)."""
    shot = folder / SHOT_FILES[2]
    vp = folder / VELOCITY_FILE
    if kind == "missing":
        shot.unlink()
        return SHOT_FILES[2], "missing file"
    if kind == "shape":
        np.save(shot, np.zeros((10000, 31), np.float32))
        return SHOT_FILES[2], r"shape \(10000, 31\), expected \(10001, 31\)"
    if kind == "dtype":
        np.save(shot, np.zeros((10001, 31), np.int32))
        return SHOT_FILES[2], "dtype int32 is not floating point"
    if kind == "nan":
        a = np.load(shot)
        a[5, 3] = np.nan
        np.save(shot, a)
        return SHOT_FILES[2], "1 NaN and 0 Inf"
    if kind == "inf":
        a = np.load(vp)
        a[0, 0] = np.inf
        np.save(vp, a)
        return VELOCITY_FILE, "0 NaN and 1 Inf"
    if kind == "truncated":
        data = shot.read_bytes()
        shot.write_bytes(data[: len(data) // 2])
        return SHOT_FILES[2], "not a readable .npy file"
    if kind == "not_npy":
        shot.write_text("hello, this is not numpy\n")
        return SHOT_FILES[2], "not a .npy file"
    if kind == "object":
        a = np.empty((10001, 31), dtype=object)
        # writing a hostile file for the test; never loaded with pickle
        np.save(shot, a, allow_pickle=True)
        return SHOT_FILES[2], "object array"
    if kind == "range":
        a = np.load(vp)
        a[10, 10] = 12.0
        np.save(vp, a)
        return VELOCITY_FILE, r"outside the allowed range \[0.5, 10.0\]"
    raise AssertionError(kind)


BAD_KINDS = ["missing", "shape", "dtype", "nan", "inf", "truncated", "not_npy", "object", "range"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_named(tmp_path, kind):
    write_sample(tmp_path / "s")
    name, message = _corrupt(tmp_path / "s", kind)
    with pytest.raises(DataError, match=message) as e:
        read_sample(tmp_path / "s")
    assert str(tmp_path / "s" / name) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_velocity_range_configurable(tmp_path):
    write_sample(tmp_path / "s")  # velocities in [1.5, 4.5]
    read_sample(tmp_path / "s", v_range=(1.0, 5.0))
    with pytest.raises(DataError, match="outside the allowed range"):
        read_sample(tmp_path / "s", v_range=(2.0, 5.0))


def test_check_dataset_lists_every_bad_sample(tmp_path):
    kinds = ["nan", "object", "range"]
    write_sample(tmp_path / "good", seed=1)
    for k in kinds:
        write_sample(tmp_path / f"bad_{k}")
        _corrupt(tmp_path / f"bad_{k}", k)
    ids = list_samples(tmp_path)
    assert ids == ["bad_nan", "bad_object", "bad_range", "good"]
    bad = check_dataset(tmp_path, ids)
    assert [i for i, _ in bad] == ["bad_nan", "bad_object", "bad_range"]
    assert "NaN" in bad[0][1] and "object array" in bad[1][1] and "outside" in bad[2][1]


def test_list_samples_with_list_file(tmp_path):
    for i in ("a", "b", "c"):
        (tmp_path / "root" / i).mkdir(parents=True)
    (tmp_path / "l.txt").write_text("c\na\n")
    assert list_samples(tmp_path / "root", tmp_path / "l.txt") == ["a", "c"]
    (tmp_path / "m.txt").write_text("a\nzz\n")
    with pytest.raises(DataError, match="zz"):
        list_samples(tmp_path / "root", tmp_path / "m.txt")


def test_write_submission_atomic(tmp_path):
    rng = np.random.default_rng(0)
    preds = {"id_b": rng.random((300, 1259), dtype=np.float32), "id_a": rng.random((300, 1259))}
    out = tmp_path / "sub" / "submission.npz"
    write_submission(out, preds)
    with np.load(out, allow_pickle=False) as z:
        assert sorted(z.files) == ["id_a", "id_b"]
        for k, a in preds.items():
            assert z[k].dtype == np.float64
            np.testing.assert_array_equal(z[k], a.astype(np.float64))
    assert [p.name for p in out.parent.iterdir()] == ["submission.npz"]  # no temporary left
    before = out.read_bytes()
    with pytest.raises(DataError, match=r"shape \(1259, 300\)"):
        write_submission(out, {"x": np.zeros((1259, 300))})
    assert out.read_bytes() == before  # a failed write leaves the old file untouched
    assert [p.name for p in out.parent.iterdir()] == ["submission.npz"]


def test_check_cli_reports_all_and_exits_nonzero(tmp_path):
    import subprocess
    import sys

    write_sample(tmp_path / "ok")
    for k in ("truncated", "dtype"):
        write_sample(tmp_path / f"bad_{k}")
        _corrupt(tmp_path / f"bad_{k}", k)
    cmd = [sys.executable, "-m", "fwi_jax.data", "check", str(tmp_path), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert (
        "BAD bad_dtype:" in r.stdout
        and "BAD bad_truncated:" in r.stdout
        and "BAD ok" not in r.stdout
    )
    assert "1 of 3 samples good, 2 bad" in r.stdout
    (tmp_path / "l.txt").write_text("ok\n")
    r = subprocess.run(
        cmd + ["--list", str(tmp_path / "l.txt")], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
