"""Generator profiles: which recipe the synthetic shot gathers follow.

A profile fixes everything that makes two simulators' gathers differ besides the velocity model:
spatial order, absorbing boundary, time step, wavelet timing, receiver line, amplitude and how
the internal time steps become the 10,001 output samples (0.1 ms, 0–1 s).

- ``"devito"``: the devito recipe a public winner used to reproduce the challenge's data
  (thinkonward/challenges, geoscience/speed-and-structure/MGöksu/2_data_gen.ipynb): acoustic,
  2nd order in space and time on the 1 m grid, devito's critical time step
  ``sqrt(3/8)·dx / v_max`` rounded to 4 significant digits (0.14–0.155 ms for the challenge's
  models), t = 0 … ≥ 1000 ms, Ricker 15 Hz peaking at 1/f₀ = 66.7 ms with amplitude 1 (devito
  injects ``src·dt²/m``), receivers at x = 0, 10, …, 300 m (the last one 1 m outside the model,
  where the edge velocity continues), trace sample n = u(n·dt) (the recipe's one-sample shift),
  and the recipe's samples mapped linearly onto the output times with the first at 0 s and the
  last at 1 s, as the recipe's ``interp1d`` over ``linspace(0, 1, n)`` does. Devito absorbs with
  a 350 m damping layer (``damp·u_t``) on every side, a 1000 x 1959 grid of 1 m. This profile
  solves the same equation on a 2 m grid (velocity Backus-averaged, still >= 19 cells per
  wavelength at 40 Hz) at twice devito's step (the same Courant number), with the inner 200 m
  of devito's damping profile (which reflects part of the wave, so it is kept) and a 12-cell
  CPML behind it: about 12x fewer cell updates; cubic interpolation brings the traces back onto the
  recipe's step. tests/test_synth_devito.py checks the traces against devito itself.
- ``"cpml8"``: this package's own solver: 8th order in space with a 30-cell CPML on the 1 m
  grid at dt = 0.1 ms (``mode="full"``) or on a 4 m grid (``mode="fast"``), Ricker peaking at
  1.5/f₀ = 100 ms, amplitude ``DATA_AMPLITUDE``, receivers at x = 0, 10, …, 290, 299 m.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fwi_jax.synth import wave

PROFILES = ("devito", "cpml8")
DEFAULT_PROFILE = "cpml8"
DATA_AMPLITUDE = 1e-2  # cpml8: source amplitude in SI units (see fwi_jax.synth)
DEVITO_DX = 2.0  # m, grid of the devito profile
DEVITO_SPONGE = 100  # cells of devito's damping profile kept (200 m of its 350 m)
DEVITO_PML = 12  # CPML cells behind them
DEVITO_SURVEY = wave.Survey(receiver_x=tuple(10.0 * k for k in range(31)))
DEVITO_T_END_MS = 1000.0


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ValueError(f"unknown generator profile {profile!r}; choose from {PROFILES}")
    return profile


def devito_critical_dt_ms(v_max_kms: float, dx_m: float = 1.0) -> float:
    """Devito's ``Model.critical_dt`` for space_order=2 in 2-D (ms): sqrt(a1 / (dim·Σ|c|)) · dx /
    v_max with a1 = 4 and c the 5-point 2nd-derivative weights (Σ|c| = 16/3), rounded to 4
    significant digits in float32."""
    coeff = math.sqrt(4.0 / (2 * 16.0 / 3.0))
    return float(np.float32("%.3e" % (coeff * dx_m / float(v_max_kms))))


def devito_steps(dt_ms: float, t_end_ms: float = DEVITO_T_END_MS) -> int:
    """Samples of devito's ``TimeAxis(start=0, stop=t_end, step=dt)`` (float32 step)."""
    step = np.float32(dt_ms)
    return int(np.ceil((t_end_ms + step) / step))


def span_resample(traces: np.ndarray, out_nt: int = wave.OUT_NT) -> np.ndarray:
    """Linear interpolation along axis -2 from n samples onto ``out_nt``, the first sample at the
    first output time and the last at the last (the recipe's ``interp1d`` over linspace(0, 1))."""
    n = traces.shape[-2]
    pos = np.linspace(0.0, n - 1.0, out_nt)
    i0 = np.minimum(np.floor(pos).astype(np.int64), n - 2)
    w = (pos - i0).astype(np.float32)[:, None]
    a = np.take(traces, i0, axis=-2)
    b = np.take(traces, i0 + 1, axis=-2)
    return (a * (1.0 - w) + b * w).astype(np.float32)


def devito_mode(dt_ms: float) -> wave.Mode:
    """Solver grid of the devito profile for a recipe step of ``dt_ms`` (same Courant number)."""
    return wave.Mode(
        dx=DEVITO_DX,
        dt=DEVITO_DX * dt_ms * 1e-3,
        order=2,
        pml=DEVITO_PML,
        sponge=DEVITO_SPONGE,
        sponge_width=350,
    )


def recipe_traces(
    velocity: np.ndarray,
    *,
    survey: wave.Survey = DEVITO_SURVEY,
    t_end_ms: float = DEVITO_T_END_MS,
    devices=None,
    **kwargs,
) -> tuple[np.ndarray, float]:
    """The devito profile's traces on the recipe's own time axis (before the output resampling).

    velocity: (B, nx, nz) km/s, all with the same top speed's step. Returns ((B, n_src, num, R)
    float32, dt in ms) with sample n = u(n·dt)."""
    v = np.asarray(velocity, np.float32)
    dts = {devito_critical_dt_ms(m.max()) for m in v}
    if len(dts) != 1:
        raise ValueError(f"models with different devito time steps {sorted(dts)} in one call")
    dt_ms = dts.pop()
    num = devito_steps(dt_ms, t_end_ms)
    raw = wave.simulate(
        v,
        mode=devito_mode(dt_ms),
        survey=survey,
        out_dt=dt_ms * 1e-3,
        out_nt=num,
        amplitude=1.0,
        t0=1.0 / wave.F0,
        devices=devices,
        **kwargs,
    )
    return raw, dt_ms


def simulate(
    velocity: np.ndarray,
    *,
    profile: str = DEFAULT_PROFILE,
    mode: str = "fast",
    survey: wave.Survey | None = None,
    out_nt: int = wave.OUT_NT,
    t_end_ms: float = DEVITO_T_END_MS,
    devices=None,
    **kwargs,
) -> np.ndarray:
    """Shot gathers of a batch of models with a generator profile.

    velocity: (B, nx, nz) or (nx, nz) km/s on the 1 m grid. Returns (B, n_sources, out_nt,
    n_receivers) float32 (or without B). ``mode`` ("fast" | "full") applies to ``cpml8`` only;
    ``survey``/``t_end_ms`` override the profile's geometry (tests, reduced models).
    The devito profile's time step depends on each model's top speed, so models are run in
    groups of equal step (one compiled solver per step)."""
    check_profile(profile)
    v = np.asarray(velocity, np.float32)
    single = v.ndim == 2
    v = v[None] if single else v
    if profile == "cpml8":
        out = wave.simulate(
            v,
            mode=mode,
            survey=survey or wave.Survey(),
            amplitude=DATA_AMPLITUDE,
            out_nt=out_nt,
            devices=devices,
            **kwargs,
        )
        return out[0] if single else out
    survey = survey or DEVITO_SURVEY
    dts = np.array([devito_critical_dt_ms(m.max()) for m in v])
    out = None
    for dt_ms in np.unique(dts):
        group = np.flatnonzero(dts == dt_ms)
        raw, _ = recipe_traces(
            v[group], survey=survey, t_end_ms=t_end_ms, devices=devices, **kwargs
        )
        res = span_resample(raw, out_nt)
        if out is None:
            out = np.empty((len(v), *res.shape[1:]), np.float32)
        out[group] = res
    return out[0] if single else out


DEVITO_GRIDS = {"full": None, "fast": 6.0}  # solver mode -> grid (m) of the refinement's solver


def devito_solver_mode(v_max: float, mode: str = "fast") -> wave.Mode:
    """The grid on which the devito profile is differentiated, stable up to ``v_max`` km/s.

    ``"full"``: the profile's own 2 m, 2nd-order grid; ``"fast"``: a 6 m grid with a 4th-order
    stencil, the same 200 m of devito's damping (in metres) and 5 CPML cells behind it (30 m, the
    thickness of the profile's CPML), about 10x fewer cell updates. Measured against devito's own
    gathers (docs/physics.md) the fast grid is as close as the profile's 2 m grid; an 8th-order
    stencil or a 72 m CPML on the 6 m grid doubled the difference below 6 Hz. The step is 90 %
    of the scheme's stability limit at ``v_max``; the traces are interpolated onto the recipe's
    clock (``devito_shots``)."""
    if mode not in DEVITO_GRIDS:
        raise ValueError(f"devito solver mode {mode!r}: choose from {tuple(DEVITO_GRIDS)}")
    dx = DEVITO_GRIDS[mode]
    if dx is None:
        base = devito_mode(1.0)
    else:
        sponge = int(round(DEVITO_SPONGE * DEVITO_DX / dx))
        # order 4 holds its outer 2 CPML cells at zero: 7 cells = 5 absorbing ones
        base = wave.Mode(dx=dx, dt=1.0, order=4, pml=7, sponge=sponge, sponge_width=350)
    return dataclasses.replace(base, dt=0.9 * wave.cfl_limit(base.order) * base.dx / (v_max * 1e3))


def recipe_clock(model_v_max: float) -> np.ndarray:
    """(recipe step dt in ms, recipe samples − 1) of the devito recipe for a model whose top
    speed is ``model_v_max`` km/s, float32, as ``devito_shots`` takes them (traced)."""
    dt = devito_critical_dt_ms(model_v_max)
    return np.array([dt, devito_steps(dt) - 1], np.float32)


def devito_shots(
    v,
    clock,
    *,
    v_max: float,
    mode: str = "fast",
    keep: int = wave.OUT_NT,
    survey: wave.Survey = DEVITO_SURVEY,
    solver: wave.Mode | None = None,
    **kwargs,
):
    """Differentiable devito-profile gathers of one model v (nx, nz) km/s: (n_src, keep, R), the
    first ``keep`` output samples (0.1 ms) of the recipe whose clock is ``clock`` (a traced
    ``recipe_clock``), simulated with ``devito_solver_mode(v_max, mode)`` (or ``solver``, a
    custom grid for tests). Output sample j is the recipe's linear blend at position j·(num −
    1)/(out − 1) of its samples u(i·dt), which are interpolated from the solver's own step. One
    compiled program serves every recipe step. ``kwargs`` go to ``wave.simulate_shots``
    (``adjoint``, ``remat``, ``block``, ``shot_batch``, ``model_dx``)."""
    import jax.numpy as jnp

    sm = solver or devito_solver_mode(v_max, mode)
    # the last output time is at most (keep − 1)/(out − 1)·(1 s + dt): 1 ms of margin covers
    # every recipe step (< 0.5 ms) and the interpolation's taps
    t_end = (keep - 1) / (wave.OUT_NT - 1) * DEVITO_T_END_MS * 1e-3 + 1e-3
    n_sim = int(math.ceil(t_end / sm.dt)) + 3
    raw = wave.simulate_shots(
        v,
        mode=sm,
        survey=survey,
        out_dt=sm.dt,
        out_nt=n_sim,
        amplitude=1.0,
        t0=1.0 / wave.F0,
        **kwargs,
    )
    dt_ms, last = clock[0], clock[1]
    pos = jnp.arange(keep, dtype=jnp.float32) * (last / (wave.OUT_NT - 1))
    i0 = jnp.minimum(jnp.floor(pos), last - 1)
    w = (pos - i0)[:, None]
    a = wave.interpolate_at(raw, sm.dt, i0 * dt_ms * 1e-3)
    b = wave.interpolate_at(raw, sm.dt, (i0 + 1) * dt_ms * 1e-3)
    return a * (1.0 - w) + b * w
