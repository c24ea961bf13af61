"""The devito recipe for the competition's shot gathers, used by the parity test and
scripts/bench_synth.py (devito is a test dependency only; it compiles C with the system compiler).

Facts from the public recipe (thinkonward/challenges,
geoscience/speed-and-structure/MGöksu/2_data_gen.ipynb, devito 4.8.19): devito's seismic
``Model`` with ``space_order=2``, 1 m spacing, ``nbl=350``, ``bcs="damp"``, float32, time step
``model.critical_dt``; ``TimeAxis(0, 1000 ms, dt)``; ``RickerSource`` f0 = 0.015 kHz (peak at
1/f0); source at x = index − 1 m, 20 m deep; 31 receivers at x = 0, 10, ..., 300 m, 10 m deep;
the PDE ``m u_tt − ∇²u + damp u_t = 0`` with the source injected into u(t + dt) as
``src·dt²/m`` and the receivers reading u(t + dt); then the last sample is dropped and one zero
sample prepended. Velocities in km/s, times in ms, lengths in m.
"""

from __future__ import annotations

import os

import numpy as np


def configure(threads: int | None = None) -> None:
    """Environment for devito in a fresh clone with no network, set before devito is imported:
    the system gcc, quiet logs; plain C on one core, or OpenMP on ``threads`` cores. Devito caches
    the compiled operators in its own folder under the system temporary directory."""
    os.environ.setdefault("DEVITO_ARCH", "gcc")
    os.environ.setdefault("DEVITO_LOGGING", "ERROR")
    if threads and threads > 1:
        os.environ.setdefault("DEVITO_LANGUAGE", "openmp")
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    else:
        os.environ.setdefault("DEVITO_LANGUAGE", "C")


def shot(
    v: np.ndarray,
    source_x: float,
    *,
    source_z: float = 20.0,
    receiver_x=None,
    receiver_z: float = 10.0,
    t_end_ms: float = 1000.0,
    f0_khz: float = 0.015,
    nbl: int = 350,
) -> tuple[np.ndarray, float]:
    """One shot of the recipe. v: (nx, nz) km/s on a 1 m grid (axis 0 = x, axis 1 = depth).

    Returns (traces (num, R) float32 after the one-sample shift, dt in ms)."""
    from devito import Eq, Operator, TimeFunction, solve
    from examples.seismic import Model, Receiver, RickerSource, TimeAxis

    receiver_x = np.arange(0, 301, 10.0) if receiver_x is None else np.asarray(receiver_x, float)
    v = np.ascontiguousarray(v, np.float32)
    model = Model(
        vp=v,
        origin=(0.0, 0.0),
        shape=v.shape,
        spacing=(1.0, 1.0),
        space_order=2,
        nbl=nbl,
        bcs="damp",
    )
    dt = model.critical_dt
    time_range = TimeAxis(start=0.0, stop=t_end_ms, step=dt)
    src = RickerSource(name="src", grid=model.grid, f0=f0_khz, time_range=time_range)
    src.coordinates.data[0, 0] = source_x
    src.coordinates.data[0, -1] = source_z
    rec = Receiver(name="rec", grid=model.grid, time_range=time_range, npoint=len(receiver_x))
    rec.coordinates.data[:, 0] = receiver_x
    rec.coordinates.data[:, 1] = receiver_z
    u = TimeFunction(name="u", grid=model.grid, time_order=2, space_order=2)
    pde = model.m * u.dt2 - u.laplace + model.damp * u.dt
    stencil = Eq(u.forward, solve(pde, u.forward))
    src_term = src.inject(field=u.forward, expr=src * dt**2 / model.m)
    rec_term = rec.interpolate(expr=u.forward)
    op = Operator([stencil] + src_term + rec_term, subs=model.spacing_map)
    op(time=time_range.num - 1, dt=dt)
    traces = np.pad(np.asarray(rec.data)[:-1], ((1, 0), (0, 0)))
    return traces.astype(np.float32), float(dt)
