"""Accuracy, absorption, convergence, reciprocity and gradients of the JAX acoustic solver.

Small grids (5-10 m cells, <= 0.6 s) keep the whole file around a minute on 2 CPU cores; the
physics is the same code path as the 1 m competition grid.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import hankel2

from fwi_jax.synth import wave as W

C = 2.0  # km/s, homogeneous test medium
F0 = 15.0


def analytic_trace(r_m: float, c_kms: float, dt: float, nt: int, f0: float = F0) -> np.ndarray:
    """u = f * G2D for (1/c²)u_tt − ∇²u = f δ: G(ω) = −(i/4) H0⁽²⁾(ω r / c) (numpy's e^{−iωt})."""
    n = 16 * nt  # long enough that the FFT's periodic wrap-around is far below the tolerance
    t = np.arange(n) * dt
    f = np.asarray(W.ricker(t, f0), np.float64)
    omega = 2 * np.pi * np.fft.rfftfreq(n, dt)
    g = np.zeros(len(omega), complex)
    g[1:] = -0.25j * hankel2(0, omega[1:] * r_m / (c_kms * 1e3))  # the Ricker has no DC
    return np.fft.irfft(np.fft.rfft(f) * g, n)[:nt]


def run_homogeneous(dx, order, n_cells, src, recs, t_end, pml=20, courant=0.4, v=C):
    """Homogeneous square model; src (x, z) and recs [(x, z)] in metres -> (t, traces (nt, R))."""
    mode = W.Mode(dx=dx, dt=courant * dx / (4.5e3), order=order, pml=pml)
    nt = int(round(t_end / mode.dt)) + 1
    model = jnp.full((n_cells, n_cells), v, jnp.float32)
    # one survey per receiver depth is not needed: all receivers share src's depth here
    survey = W.Survey(
        source_x=(src[0],),
        source_z=src[1],
        receiver_x=tuple(r[0] for r in recs),
        receiver_z=recs[0][1],
    )
    tr = W.simulate_shots(model, mode=mode, survey=survey, out_dt=mode.dt, out_nt=nt, model_dx=dx)
    return mode, np.asarray(tr[0], np.float64)


def windowed_error(dx, order, offsets=(100.0, 200.0)):
    """Relative L2 error vs the analytic trace before any boundary reflection arrives."""
    n = int(round(800 / dx))
    centre = (n // 2) * dx
    mode, tr = run_homogeneous(
        dx, order, n, (centre, centre), [(centre + o, centre) for o in offsets], 0.33
    )
    errs = []
    for j, off in enumerate(offsets):
        ref = analytic_trace(off, C, mode.dt, tr.shape[0])
        # first reflection: from the nearest edge (400 m away) -> >= (400 + 400 - off)/c >= 0.35 s
        errs.append(np.linalg.norm(tr[:, j] - ref) / np.linalg.norm(ref))
    return errs


def test_cfl_is_checked():
    with pytest.raises(W.CFLError, match="Courant"):
        W.check_cfl(4.5, W.Mode(dx=1.0, dt=2e-4))
    assert W.check_cfl(4.5, W.MODES["full"]) < W.cfl_limit(8)
    assert W.check_cfl(4.5, W.MODES["fast"]) < W.cfl_limit(8)
    with pytest.raises(W.CFLError):
        W.simulate(np.full((1, 300, 1259), 4.5, np.float32), mode=W.Mode(dx=1.0, dt=2e-4))


def test_fd_coefficients():
    # order 2: [-2, 1]; order 4: [-5/2, 4/3, -1/12]; first derivative order 2: [1/2]
    np.testing.assert_allclose(W.second_derivative_coeffs(2), [-2, 1])
    np.testing.assert_allclose(W.second_derivative_coeffs(4), [-2.5, 4 / 3, -1 / 12])
    np.testing.assert_allclose(W.first_derivative_coeffs(2), [0.5])
    # exact on polynomials of degree order+1: d²/dx² x⁴ at 0 is 0, of x² is 2
    c = W.second_derivative_coeffs(8)
    x = np.arange(-4, 5)
    full = np.concatenate([c[:0:-1], c])
    assert abs(full @ x**2 - 2) < 1e-12 and abs(full @ x**4) < 1e-12


def test_homogeneous_matches_analytic_green_function():
    # 8th order, 5 m cells (13 cells per shortest wavelength of interest, 40 Hz at 2 km/s)
    errs = windowed_error(5.0, 8)
    assert max(errs) <= 0.02, errs


def test_error_falls_on_refinement():
    # 4th order makes the dispersion error large enough to see it fall with dx
    coarse = windowed_error(10.0, 4, offsets=(200.0,))[0]
    fine = windowed_error(5.0, 4, offsets=(200.0,))[0]
    assert fine < 0.5 * coarse, (coarse, fine)


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_boundary_reflections_below_one_percent(mode):
    # A 200 m square model with the source 12 m from its left edge (competition sources sit on
    # the edge) and the receiver 100 m away: everything the trace has beyond the analytic
    # free-space answer is reflected by the absorbing boundaries (plus the < 0.1 % FD error).
    m = W.MODES[mode]
    mode_, tr = run_homogeneous(
        m.dx, m.order, int(200 / m.dx), (12.0, 100.0), [(112.0, 100.0)], 0.5, pml=m.pml
    )
    ref = analytic_trace(100.0, C, mode_.dt, tr.shape[0])
    reflected = np.abs(tr[:, 0] - ref).max() / np.abs(ref).max()
    assert reflected < 0.01, reflected


def test_reciprocity_in_a_heterogeneous_model():
    rng = np.random.default_rng(0)
    dx = 5.0
    v = 2.0 + 0.5 * rng.random((60, 60))
    v = np.asarray(jax.image.resize(jnp.asarray(v[::6, ::6], jnp.float32), (60, 60), "linear"))
    mode = W.Mode(dx=dx, dt=0.4 * dx / 4.5e3, order=8, pml=16)
    a, b = (50.0, 60.0), (230.0, 60.0)  # two points at the same depth
    nt = int(0.4 / mode.dt)
    kw = dict(mode=mode, out_dt=mode.dt, out_nt=nt, model_dx=dx)
    ab = W.simulate_shots(
        v,
        survey=W.Survey(source_x=(a[0],), source_z=a[1], receiver_x=(b[0],), receiver_z=b[1]),
        **kw,
    )
    ba = W.simulate_shots(
        v,
        survey=W.Survey(source_x=(b[0],), source_z=b[1], receiver_x=(a[0],), receiver_z=a[1]),
        **kw,
    )
    ab, ba = np.asarray(ab[0, :, 0]), np.asarray(ba[0, :, 0])
    assert np.abs(ab).max() > 1e-3
    # float32 round-off over ~1,400 steps and the CPML (not exactly self-adjoint) bound this
    assert np.linalg.norm(ab - ba) / np.linalg.norm(ab) < 1e-3


def two_layer_misfit(mode, survey, out_nt, **kw):
    """v -> 0.5·‖d(v) − d_obs‖² on a 40 x 40 grid of 10 m; d_obs of 2.0 over 2.8 km/s at 200 m.
    Keyword arguments of the returned function go to ``simulate_shots`` too."""
    zz = np.arange(40) * 10.0
    v_true = np.broadcast_to(np.where(zz < 200, 2.0, 2.8), (40, 40)).astype(np.float32)
    kw = dict(mode=mode, survey=survey, out_dt=mode.dt, out_nt=out_nt, model_dx=10.0, **kw)
    d_obs = W.simulate_shots(jnp.asarray(v_true), **kw)

    def misfit(v, **extra):
        return 0.5 * jnp.sum((W.simulate_shots(v, **kw, **extra) - d_obs) ** 2)

    return misfit


def test_gradient_matches_finite_difference():
    n = 40
    mode = W.Mode(dx=10.0, dt=0.4 * 10.0 / 4.5e3, order=4, pml=10)
    survey = W.Survey(
        source_x=(100.0, 300.0),
        source_z=20.0,
        receiver_x=tuple(np.arange(0.0, 400.0, 40.0)),
        receiver_z=10.0,
    )
    misfit = two_layer_misfit(mode, survey, int(0.4 / mode.dt), remat=True, block=20)
    v0 = jnp.full((n, n), 2.2, jnp.float32)
    g = jax.grad(misfit)(v0)
    assert g.shape == v0.shape and bool(jnp.all(jnp.isfinite(g)))
    direction = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), jnp.float32)
    eps = 1e-3
    fd = (misfit(v0 + eps * direction) - misfit(v0 - eps * direction)) / (2 * eps)
    ad = jnp.vdot(g, direction)
    # float32 central difference: relative agreement to ~1% is what the rounding allows
    assert abs(float(fd) - float(ad)) < 0.02 * abs(float(fd)), (float(fd), float(ad))


@pytest.mark.full  # fast siblings: the finite-difference tests and refinement with the adjoint
@pytest.mark.parametrize(
    "mode",
    [
        W.Mode(dx=10.0, dt=1e-3, order=8, pml=12),
        # devito's damping layer between the model and the CPML (the devito profile's scheme)
        W.Mode(dx=10.0, dt=1e-3, order=2, pml=6, sponge=10, sponge_width=150),
    ],
    ids=["cpml", "damping-layer"],
)
def test_adjoint_gradient_matches_jax_inside_the_model(mode):
    """The adjoint-state gradient (``adjoint=True``) against JAX's exact discrete one: equal in
    the model's cells away from its edges (measured: 1.1e-3 relative at full size, fast mode;
    1e-5 and 1e-6 here); the edge cells lack the share of the padding, which repeats them (see
    wave._adjoint_bwd). The damping term is odd in time, so the same scheme run backward in time
    is its adjoint too."""
    survey = W.Survey(
        source_x=(100.0, 250.0),
        source_z=30.0,
        receiver_x=tuple(np.arange(40.0, 360.0, 20.0)),
        receiver_z=20.0,
    )
    misfit = two_layer_misfit(mode, survey, 500, block=50)
    v0 = jnp.asarray(np.broadcast_to(1.9 + 0.02 * np.arange(40), (40, 40)), jnp.float32)
    g_jax = np.asarray(jax.grad(misfit)(v0))
    g_adj = np.asarray(jax.grad(lambda v: misfit(v, adjoint=True))(v0))
    inner = (slice(2, -2), slice(2, -2))
    err = np.linalg.norm(g_adj[inner] - g_jax[inner]) / np.linalg.norm(g_jax[inner])
    assert err < 5e-3, err
    # the same traces (up to float32 rounding: the loop is cut differently)
    assert abs(float(misfit(v0, adjoint=True)) - float(misfit(v0))) < 1e-5 * float(misfit(v0))


@pytest.mark.full
def test_models_sharded_over_two_devices_match_one_device(tmp_path):
    out = str(tmp_path / "out.npy")
    code = textwrap.dedent(
        f"""
        import numpy as np, jax
        from fwi_jax.synth import wave as W
        assert jax.device_count() == 2
        rng = np.random.default_rng(0)
        v = (2.0 + rng.random((3, 60, 60))).astype(np.float32)
        mode = W.Mode(dx=10.0, dt=8e-4, order=4, pml=8)
        survey = W.Survey(source_x=(100.0, 400.0), source_z=20.0,
                          receiver_x=(0.0, 250.0, 590.0), receiver_z=10.0)
        kw = dict(mode=mode, survey=survey, out_dt=8e-4, out_nt=200, model_dx=10.0)
        sharded = W.simulate(v, **kw)
        single = np.stack([np.asarray(W.simulate_shots(m, **kw)) for m in v])
        np.save({out!r}, np.stack([sharded, single]))
        """
    )
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    sharded, single = np.load(tmp_path / "out.npy")
    assert np.abs(single).max() > 0
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-6 * np.abs(single).max())


def test_damping_layer_beside_the_cpml_stays_stable():
    """Devito's damping layer with the CPML behind it, a fast homogeneous model, 1 s: the record
    decays once the direct wave has left (where the depth sponge crosses the x strips, their CPML
    terms must be damped as the rest of the update: added undamped, the record grew to 1e31)."""
    mode = W.Mode(dx=2.0, dt=0.6 * 2.0 / 3.5e3, order=2, pml=12, sponge=100, sponge_width=350)
    survey = W.Survey(source_x=(20.0,), source_z=20.0, receiver_x=(0.0, 30.0))
    v = jnp.full((40, 100), 3.5, jnp.float32)
    s = np.asarray(
        W.simulate_shots(v, mode=mode, survey=survey, out_dt=mode.dt, out_nt=2900, model_dx=2.0)
    )
    assert np.isfinite(s).all()
    assert np.abs(s[:, -500:]).max() < 1e-3 * np.abs(s).max()


def test_interpolation_at_traced_times_is_resample_time():
    """``interpolate_at`` (the devito profile's traced clock) against ``resample_time``: the same
    weights, up to float32 rounding of the positions (~2e-4 on unit white noise)."""
    x = np.random.default_rng(0).standard_normal((2, 500, 3)).astype(np.float32)
    ref = np.asarray(W.resample_time(jnp.asarray(x), 4e-4, 1e-4, 1990))
    t = jnp.arange(1990, dtype=jnp.float32) * 1e-4
    np.testing.assert_allclose(
        np.asarray(W.interpolate_at(jnp.asarray(x), 4e-4, t)), ref, atol=1e-3
    )
