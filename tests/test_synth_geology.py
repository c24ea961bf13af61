"""Velocity-model families and the competition-format dataset writer."""

import os

import numpy as np
import pytest

from fwi_jax import synth
from fwi_jax.synth import geology as G
from fwi_jax.synth import wave as W


@pytest.mark.parametrize("family", G.FAMILIES)
def test_models_have_the_competition_shape_range_and_water_layer(family):
    for seed in range(4):
        v = G.velocity_model(seed, family)
        assert v.shape == (300, 1259) and v.dtype == np.float32
        assert v.min() >= 1.5 and v.max() <= 4.5
        # water: the top 150 m is ~1.5 km/s everywhere; the sea floor lies in 150-420 m
        assert np.all(np.abs(v[:, :150] - 1.5) <= 0.021)
        floor = np.argmax(v > 1.53, axis=1)
        assert floor.min() >= 150 and floor.max() <= 420
        # velocity rises with depth: the bottom 200 m is faster than the first 100 m of sediment
        below = np.stack([v[i, f : f + 100].mean() for i, f in enumerate(floor)])
        assert v[:, -200:].mean() > below.mean() + 0.5
        # thin layers: many distinct velocities down a column
        assert len(np.unique(np.round(v[150], 3))) >= 10


def test_models_are_seeded():
    a, b, c = (
        G.velocity_model(7, "faulted"),
        G.velocity_model(7, "faulted"),
        G.velocity_model(8, "faulted"),
    )
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.1


def test_families_differ_as_described():
    # salt: a body of >= 4.3 km/s covering thousands of cells; faults: layers offset, so a
    # sediment column differs from its neighbour more than in the unfaulted twin of the same seed
    salt_cells = [np.sum(G.velocity_model(s, "salt") >= 4.3) for s in range(5)]
    assert min(salt_cells) > 2000, salt_cells

    def max_lateral_jump(v):
        return np.abs(np.diff(v[:, 500:], axis=0)).max()

    jumps = [
        (
            max_lateral_jump(G.velocity_model(s, "faulted")),
            max_lateral_jump(G.velocity_model(s, "layered")),
        )
        for s in range(5)
    ]
    assert sum(f > 0.2 for f, _ in jumps) >= 3, jumps


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown velocity-model family 'reef'"):
        G.velocity_model(0, "reef")
    with pytest.raises(ValueError, match="reef"):
        synth.make_dataset("/nonexistent-never-created", 1, families=("reef",))


def test_make_dataset_writes_the_competition_format_atomically_and_resumes(tmp_path, monkeypatch):
    # a cheap solver mode keeps this test fast; the file layout and dtypes are the same
    cheap = W.Mode(dx=10.0, dt=1e-3, order=4, pml=8)
    ids = synth.make_dataset(tmp_path, 2, seed=3, families=("layered",), mode=cheap, progress=False)
    assert ids == ["synth_s3_000000", "synth_s3_000001"]
    assert sorted(os.listdir(tmp_path)) == ids  # no temporary folders left behind
    for sid in ids:
        folder = tmp_path / sid
        assert sorted(os.listdir(folder)) == sorted([*synth.SHOT_FILES, "vp_model.npy"])
        v = np.load(folder / "vp_model.npy")
        assert v.shape == (300, 1259) and v.dtype == np.float32
        for name in synth.SHOT_FILES:
            g = np.load(folder / name)
            assert g.shape == (10001, 31) and g.dtype == np.float32 and np.all(np.isfinite(g))
        np.testing.assert_array_equal(v, synth.sample_model(3, int(sid[-6:]), ("layered",))[1])
    # shots differ (different source positions); the direct wave is strongest near each source
    g1 = np.load(tmp_path / ids[0] / "receiver_data_src_1.npy")
    g300 = np.load(tmp_path / ids[0] / "receiver_data_src_300.npy")
    assert np.abs(g1[:, 0]).max() > np.abs(g1[:, 30]).max()
    assert np.abs(g300[:, 30]).max() > np.abs(g300[:, 0]).max()

    # a rerun only computes what is missing: delete one folder, make the solver count calls
    stamp = os.stat(tmp_path / ids[0] / "vp_model.npy").st_mtime_ns
    import shutil

    shutil.rmtree(tmp_path / ids[1])
    calls = []
    real = synth.simulate
    monkeypatch.setattr(synth, "simulate", lambda v, **kw: calls.append(len(v)) or real(v, **kw))
    synth.make_dataset(tmp_path, 3, seed=3, families=("layered",), mode=cheap, progress=False)
    assert sum(calls) == 2  # samples 1 and 2, not 0
    assert os.stat(tmp_path / ids[0] / "vp_model.npy").st_mtime_ns == stamp
    assert all(synth.is_complete(tmp_path / s) for s in [*ids, "synth_s3_000002"])


def test_cli_writes_and_skips(tmp_path, capsys):
    from fwi_jax.synth.__main__ import main

    # one fast-mode sample at the full competition geometry (a few seconds on 2 cores)
    argv = ["--n", "1", "--out", str(tmp_path), "--seed", "5", "--family", "salt"]
    argv += ["--cpu-devices", "1", "--no-progress"]
    assert main(argv) == 0
    folder = tmp_path / "synth_s5_000000"
    assert synth.is_complete(folder)
    g = np.load(folder / "receiver_data_src_150.npy")
    assert g.shape == (10001, 31) and np.abs(g).max() > 0
    np.testing.assert_array_equal(
        np.load(folder / "vp_model.npy"), synth.sample_model(5, 0, ("salt",))[1]
    )
    stamp = os.stat(folder / "receiver_data_src_150.npy").st_mtime_ns
    assert main(argv) == 0  # the second run skips the complete sample
    assert os.stat(folder / "receiver_data_src_150.npy").st_mtime_ns == stamp
