"""Data misfit and waveform refinement (fwi_jax.physics, python -m fwi_jax.refine / physics).

The library tests run a reduced geometry (a 300 m x 400 m model on a 10 m grid, 0.5 s, three
shots) so that a gradient step takes well under a second; the CLI tests run the competition
geometry in fast mode on the first 50 ms only (--t-max)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwi_jax import physics, refine
from fwi_jax.data import io
from fwi_jax.loss import competition_mape
from fwi_jax.synth import profiles, wave

TINY = physics.Forward(
    t_max=0.5,
    survey=wave.Survey(
        source_x=(50.0, 150.0, 250.0),
        source_z=20.0,
        receiver_x=tuple(float(x) for x in range(0, 300, 20)),
        receiver_z=10.0,
    ),
    model_dx=10.0,
    mode_override=wave.Mode(dx=10.0, dt=1e-3, order=8, pml=12),
    block=50,
)


# the devito profile on the same reduced geometry: 2nd order with devito's damping layer (100 m
# of it) and CPML behind, its recipe's clock and wavelet
TINY_DEVITO = dataclasses.replace(
    TINY,
    profile="devito",
    mode_override=wave.Mode(dx=10.0, dt=1e-3, order=2, pml=6, sponge=10, sponge_width=350),
)


def tiny_truth() -> np.ndarray:
    """(30, 40) km/s on a 10 m grid: a depth gradient, a fast layer and a slow lens."""
    z = np.arange(40) / 39.0
    v = np.broadcast_to(1.8 + 1.4 * z, (30, 40)).copy()
    v[:, 18:24] += 0.6
    v[10:20, 8:13] -= 0.4
    return v.astype(np.float32)


def smooth(v: np.ndarray, k: int = 7) -> np.ndarray:
    """Box blur along depth (a start that lacks the sharp layers)."""
    pad = np.pad(v, ((0, 0), (k // 2, k // 2)), mode="edge")
    return np.stack([np.convolve(row, np.ones(k) / k, mode="valid") for row in pad]).astype(
        np.float32
    )


def test_misfit_ranks_a_perturbed_model_worse_than_the_truth():
    v = tiny_truth()
    obs = TINY.simulate(v)
    assert physics.misfit(TINY, v, obs) < 1e-6
    small = physics.misfit(TINY, v * 1.02, obs)
    large = physics.misfit(TINY, v * 1.06, obs)
    blurred = physics.misfit(TINY, smooth(v), obs)
    assert 0.05 < small < large
    assert blurred > 0.05


@pytest.mark.parametrize(
    "gradient,depth_power,method",
    [
        ("adjoint", 1.0, "lbfgs"),
        ("adjoint", 1.0, "momentum"),
        pytest.param("autodiff", 1.0, "lbfgs", marks=pytest.mark.full),
        pytest.param("adjoint", 0.0, "momentum", marks=pytest.mark.full),  # fast sibling: power 1
    ],
)
def test_refinement_lowers_the_misfit_and_the_error_on_a_tiny_case(gradient, depth_power, method):
    truth = tiny_truth()
    obs = TINY.simulate(truth)[None]
    start = smooth(truth)[None]
    cfg = physics.RefineConfig(
        stages=((8.0, 4), (None, 6)),
        lr=0.05,
        tv=0.0,
        gradient=gradient,
        depth_power=depth_power,
        method=method,
    )
    res = physics.refine(TINY, start, obs, cfg)
    assert res.kept == ["refined"]
    assert res.misfit_after[0] < 0.7 * res.misfit_before[0], (res.misfit_before, res.misfit_after)
    assert competition_mape(truth, res.velocity[0]) < competition_mape(truth, start[0])
    assert res.velocity.min() >= cfg.v_range[0] and res.velocity.max() <= cfg.v_range[1]
    # the band-limited misfit falls along each stage
    assert all(h[-1, 0] < h[0, 0] for h in res.history), res.history
    assert [h.shape for h in res.history] == [(4, 1), (6, 1)]


@pytest.mark.parametrize("gradient", ["adjoint", pytest.param("autodiff", marks=pytest.mark.full)])
def test_devito_profile_gradient_matches_finite_differences(gradient):
    """The gradient of the devito profile's misfit (damping layer, recipe clock and resampling
    included) against a central difference along a random direction inside the model (the
    adjoint-state gradient leaves the padding, which repeats the edge cells, out: see
    wave._adjoint_bwd)."""
    truth = tiny_truth()
    clock = jnp.asarray(TINY_DEVITO.clock(truth))
    obs = TINY_DEVITO.traces(jnp.asarray(truth), clock)
    adjoint = gradient == "adjoint"

    def loss(v):
        sim = TINY_DEVITO.traces(v, clock, remat=not adjoint, adjoint=adjoint)
        return jnp.sum((sim - obs) ** 2) / jnp.sum(obs**2)

    v0 = jnp.asarray(smooth(truth))
    g = np.asarray(jax.jit(jax.grad(loss))(v0))
    direction = np.zeros_like(truth)
    direction[2:-2, 2:-2] = np.random.default_rng(3).standard_normal((26, 36))
    eps = 2e-3
    f = jax.jit(loss)
    fd = (float(f(v0 + eps * direction)) - float(f(v0 - eps * direction))) / (2 * eps)
    ad = float(np.vdot(g, direction))
    # float32 central difference of a misfit of ~0.3: 1 % is what its rounding allows
    assert abs(fd - ad) < 0.01 * abs(fd), (fd, ad)


def test_devito_profile_solver_follows_the_generator():
    """The refinement's devito traces (any solver step, the recipe's clock traced) against the
    generator's (profiles.simulate: twice the recipe's step, then its resampling) on a reduced
    model: the same gathers up to the time step's dispersion."""
    v = np.broadcast_to(1.8 + 1.2 * np.linspace(0, 1, 200), (80, 200)).astype(np.float32).copy()
    v[30:50, 90:120] = 3.6
    survey = wave.Survey(source_x=(20.0, 60.0), source_z=20.0, receiver_x=(0.0, 30.0, 79.0))
    ref = profiles.simulate(v, profile="devito", survey=survey)
    fwd = physics.Forward(profile="devito", mode_name="full", survey=survey)
    ours = fwd.simulate(v)
    assert fwd.mode.dt != 2 * fwd.clock(v)[0] * 1e-3  # a step of its own
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 5e-3  # measured 9e-5
    # the 6 m grid (a 4th-order stencil, the same damping in metres): measured 4.2e-3
    fast = dataclasses.replace(fwd, mode_name="fast").simulate(v)
    assert np.linalg.norm(fast - ref) / np.linalg.norm(ref) < 1.5e-2
    # a shorter window is the start of the same traces
    short = dataclasses.replace(fwd, t_max=0.3).simulate(v)
    np.testing.assert_allclose(
        short, ours[:, : short.shape[1]], rtol=0, atol=1e-6 * np.abs(ours).max()
    )


@pytest.mark.full  # fast siblings: the devito-profile gradient and solver tests above
def test_refinement_with_the_devito_profile_lowers_the_error_on_a_tiny_case():
    truth = tiny_truth()
    obs = TINY_DEVITO.simulate(truth)[None]
    start = smooth(truth)[None]
    cfg = physics.RefineConfig(stages=((8.0, 4), (None, 6)), lr=0.05, tv=0.0)
    res = physics.refine(TINY_DEVITO, start, obs, cfg)
    assert res.kept == ["refined"]
    assert res.misfit_after[0] < 0.7 * res.misfit_before[0], (res.misfit_before, res.misfit_after)
    assert competition_mape(truth, res.velocity[0]) < 0.9 * competition_mape(truth, start[0])


def test_iterates_may_undershoot_the_low_bound_and_the_result_is_clipped_to_it():
    """A model at the low bound whose data want it slower: iterates go below v_range's lo, by
    at most ``undershoot``, and the result is clipped back into v_range."""
    truth = tiny_truth()
    lo = float(truth.min()) + 0.1
    start = np.maximum(truth, lo)[None]
    obs = jnp.asarray(TINY.simulate(truth)[None, :, : TINY.n_t])
    cfg = physics.RefineConfig(
        stages=((None, 3),), lr=0.3, tv=0.0, v_range=(lo, 4.5), undershoot=0.05
    )
    step = physics.make_stage_step(TINY, cfg, None)
    v = jnp.asarray(start)
    state = jax.vmap(physics.make_optimizer(cfg).init)(v)
    clock = jnp.asarray(TINY.clock(start[0])[None])
    for _ in range(3):
        v, state, _ = step(v, state, obs, clock)
    assert lo - 0.05 - 1e-6 <= float(v.min()) < lo - 0.005  # below lo, projected at lo − 0.05
    res = physics.refine(TINY, start, obs, cfg)
    assert res.velocity.min() >= lo
    with pytest.raises(physics.PhysicsError, match="undershoot"):
        physics.RefineConfig(undershoot=1.5).check()
    with pytest.raises(physics.PhysicsError, match="method"):
        physics.RefineConfig(method="adam").check()


def test_refinement_keeps_the_start_when_it_cannot_improve():
    truth = tiny_truth()
    obs = TINY.simulate(truth)[None]
    res = physics.refine(TINY, truth[None], obs, physics.RefineConfig(stages=((None, 2),), lr=0.3))
    assert res.kept == ["start"]
    np.testing.assert_array_equal(res.velocity[0], truth)


def test_depth_gain_scales_each_depth_cell_and_bad_settings_are_refused():
    g = np.ones((2, 3, 4), np.float32)
    out, _ = physics.depth_gain(2.0).update(g, None)
    np.testing.assert_array_equal(np.asarray(out)[1, 2], [1.0, 4.0, 9.0, 16.0])
    with pytest.raises(physics.PhysicsError, match="gradient"):
        physics.RefineConfig(gradient="fd").check()


def test_lowpass_removes_high_frequencies_and_keeps_low_ones():
    t = np.arange(10000) * wave.OUT_DT
    x = np.stack([np.sin(2 * np.pi * 4 * t), np.sin(2 * np.pi * 40 * t)], axis=-1)[None].astype(
        np.float32
    )
    y = np.asarray(physics.lowpass(x, 10.0))[0, 2500:7500]  # away from the window's edges
    assert np.abs(y[:, 0] - x[0, 2500:7500, 0]).max() < 0.02  # gain 0.9996 at 4 Hz
    assert np.abs(y[:, 1]).max() < 0.02  # gain 0.004 at 40 Hz


# ----------------------------------------------------------------------------- CLIs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two competition-format samples whose first 50 ms are cpml8 fast gathers of vp_model."""
    root = tmp_path_factory.mktemp("phys")
    fwd = physics.Forward(t_max=0.05)
    z = np.linspace(0.0, 1.0, 1259)
    preds = {}
    for k, sid in enumerate(("a", "b")):
        v = np.broadcast_to(1.6 + (2.0 + 0.3 * k) * z, (300, 1259)).astype(np.float32).copy()
        v[:, 30:60] += 0.5
        obs = np.zeros((5, io.N_TIME_RAW, io.N_RECEIVERS), np.float32)
        obs[:, : fwd.n_t] = fwd.simulate(v)
        (root / sid).mkdir()
        for name, g in zip(io.SHOT_FILES, obs):
            np.save(root / sid / name, g)
        np.save(root / sid / io.VELOCITY_FILE, v)
        preds[sid] = np.clip(v * (1.04 if k == 0 else 0.97), 1.5, 4.5)
    sub = root.parent / f"{root.name}_pred.npz"
    io.write_submission(sub, preds)
    return root, sub, preds


def test_refine_cli_writes_a_submission_and_csv(dataset, tmp_path, capsys):
    root, sub, preds = dataset
    out = tmp_path / "refined.npz"
    rc = refine.main(
        [
            "--data",
            str(root),
            "--pred",
            str(sub),
            "--out",
            str(out),
            "--t-max",
            "0.05",
            "--stages",
            "full:2",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    refined = io.read_submission(out)
    assert sorted(refined) == ["a", "b"]
    lines = (tmp_path / "refined.csv").read_text().splitlines()
    assert lines[0] == "id,misfit_before,misfit_after,kept,mape_before,mape_after"
    for line in lines[1:]:
        sid, mb, ma, kept, pb, pa = line.split(",")
        assert float(ma) < float(mb) and kept == "refined"
        truth = np.load(root / sid / io.VELOCITY_FILE)
        assert float(pb) == pytest.approx(competition_mape(truth, preds[sid]), rel=1e-6)
        assert float(pa) == pytest.approx(competition_mape(truth, refined[sid]), rel=1e-6)
        assert not np.array_equal(refined[sid], preds[sid].astype(np.float32))


def test_score_cli_writes_misfit_and_mape(dataset, tmp_path, capsys):
    root, sub, preds = dataset
    csv = tmp_path / "m.csv"
    truth_sub = tmp_path / "truth.npz"
    io.write_submission(truth_sub, {s: np.load(root / s / io.VELOCITY_FILE) for s in preds})
    assert (
        physics.main(
            [
                "--data",
                str(root),
                "--pred",
                str(sub),
                "--csv",
                str(csv),
                "--t-max",
                "0.05",
                "--no-progress",
            ]
        )
        == 0
    )
    rows = [line.split(",") for line in csv.read_text().splitlines()]
    assert rows[0] == ["id", "misfit", "mape"]
    assert (
        physics.main(
            [
                "--data",
                str(root),
                "--pred",
                str(truth_sub),
                "--csv",
                str(tmp_path / "t.csv"),
                "--t-max",
                "0.05",
                "--no-progress",
            ]
        )
        == 0
    )
    exact = [line.split(",") for line in (tmp_path / "t.csv").read_text().splitlines()]
    for (_, m, _), (_, m_true, mape_true) in zip(rows[1:], exact[1:]):
        assert float(m_true) < 1e-5 < float(m)
        assert float(mape_true) == 0.0
    capsys.readouterr()


@pytest.mark.parametrize(
    "case", ["no_pred", "bad_stages", "devito_cal", "bad_range", "unknown_id", "no_list"]
)
def test_user_errors_are_one_line(dataset, tmp_path, capsys, case):
    root, sub, _ = dataset
    args = [
        "--data",
        str(root),
        "--pred",
        str(sub),
        "--out",
        str(tmp_path / "r.npz"),
        "--no-progress",
    ]
    expect = {
        "no_pred": "does not exist",
        "bad_stages": "--stages",
        "devito_cal": "mode 'turbo'",
        "bad_range": "--v-range",
        "unknown_id": "no sample folder",
        "no_list": "id list does not exist",
    }[case]
    main = refine.main
    if case == "no_pred":
        args[3] = str(tmp_path / "missing.npz")
    elif case == "bad_stages":
        args += ["--stages", "6-6"]
    elif case == "devito_cal":
        cal = tmp_path / "cal.json"
        cal.write_text(
            json.dumps(
                {"profile": "devito", "mode": "turbo", "polarity": 1, "scale": 2.0, "shift": 0}
            )
        )
        args += ["--calibration", str(cal)]
    elif case == "no_list":
        args += ["--list", str(tmp_path / "ids.txt")]
    elif case == "bad_range":
        args += ["--v-range", "4.5", "1.5"]
    else:
        odd = tmp_path / "odd.npz"
        io.write_submission(odd, {"zz": np.full((300, 1259), 2.0)})
        args = ["--data", str(root), "--pred", str(odd), "--no-progress"]
        main = physics.main
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert not (tmp_path / "r.npz").exists()
