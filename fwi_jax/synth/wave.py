"""2-D constant-density acoustic finite-difference modelling in JAX (reference §6 geometry).

Equation: (1/v²) ∂²u/∂t² − ∇²u = f(t) δ(x − x_s), solved with a leapfrog scheme (2nd order in
time), a central stencil of order ``order`` (8 by default) in space on a square grid of spacing
``dx``, and a convolutional PML (CPML, the second-order form of Pasalic & McGarry 2010, also used
by deepwave) of ``pml`` cells on every side. The recorded trace is u itself, so a homogeneous
medium gives u = f * G₂ᴅ with G₂ᴅ(r, t) = H(t − r/v) / (2π √(t² − r²/v²)).

Conventions (competition geometry, model grid 1 m, x = column index in metres):
- velocity models are (n_x, n_z) = (300, 1259) km/s, axis 0 = x, axis 1 = depth (vp_model.npy);
- sources at x = 0, 74, 149, 224, 299 m, 20 m deep (file names receiver_data_src_{1,75,...});
- receivers at x = 0, 10, ..., 290, 299 m, 10 m deep: receiver k sits at min(10 k, 299) m, i.e.
  the competition's "x = 300 m, last one at the edge" is put on the model's last column, the same
  column as source 300;
- output: 10,001 samples, dt = 0.1 ms (t = 0 ... 1 s), Ricker 15 Hz peaking at 1.5/f₀ = 0.1 s.

Modes (``MODES``): "full" runs at the output sampling (dx = 1 m, dt = 0.1 ms, 30 CPML cells);
"fast" runs on a 4 m grid at dt = 0.4 ms with 16 CPML cells (the velocity model is reduced by a
box average of 1/v², the constant-density Backus average) and interpolates the traces back to
0.1 ms (4-point Lagrange), about 50x fewer cell updates. Its error against "full"
(scripts/bench_synth.py; docs/performance.md) is mostly the thin-layer detail the 4 m grid
averages away, not dispersion (the fast grid has >= 9 cells per 40 Hz wavelength).

Measured accuracy (tests/test_synth_wave.py): homogeneous medium vs the analytic 2-D Green's
function 0.06-0.12 % relative L2 (8th order, 5 m cells); CPML reflections 0.2 % (full) and 0.4 %
(fast) of the direct wave with the source 12 m from the edge; reciprocity 2e-6; jax.grad vs a
central difference 0.2 %.

Devito's damping layer (``Mode.sponge``, used by the "devito" generator profile): the equation
gains a term damp(x)·u_t (centred in time, as devito's ``bcs="damp"``) in ``sponge`` cells
between the model and the CPML, with devito's profile (``sponge_profile``).

Points off the grid (sources and receivers in fast mode) use separable 4-point Lagrange weights;
the same weights inject and record, which keeps the scheme source–receiver reciprocal.

Speed (XLA CPU): the leapfrog runs in increment form, w = u(t) − u(t − dt), w += c²(∇²u + CPML
terms), u += w, with w on whole rows, so each step is one fused pass over the grid plus a cheap
row-block add and small strip kernels, with no full-grid copies (the two-buffer rotation, the
2-D in-place window updates and scan unroll > 1 made XLA copy or re-walk the grid 3-4 times per
step). Throughput: ``python scripts/bench_synth.py``; figures in docs/performance.md.

Everything is plain ``jnp`` under ``jit``/``vmap``/``grad``: ``jax.grad`` of a data misfit with
respect to the velocity model works (use ``remat=True`` for long runs: each block of
``block`` time steps is rematerialised, so memory is O(n_t/block + block) wavefields).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

# Competition geometry (reference §6).
MODEL_SHAPE = (300, 1259)  # (x, depth) cells of 1 m
MODEL_DX = 1.0  # m
SOURCE_X = (0.0, 74.0, 149.0, 224.0, 299.0)  # m; file names receiver_data_src_{x+1}.npy
SOURCE_FILES = tuple(int(x) + 1 for x in SOURCE_X)  # 1, 75, 150, 225, 300
SOURCE_Z = 20.0  # m
RECEIVER_X = tuple(float(min(10 * k, 299)) for k in range(31))  # m (see module docstring)
RECEIVER_Z = 10.0  # m
OUT_DT = 1e-4  # s
OUT_NT = 10001
F0 = 15.0  # Hz
PML_REFLECTION = 1e-6  # theoretical normal-incidence reflection of the CPML
PML_ALPHA = 0.5  # CFS alpha at the inner edge, in units of pi*f0
PML_POWER = 2.0  # damping profile exponent


class CFLError(ValueError):
    """The time step is too large for the grid and velocity (the scheme would blow up)."""


@dataclasses.dataclass(frozen=True)
class Mode:
    """Internal grid of a solver mode: spacing ``dx`` (m) and step ``dt`` (s)."""

    dx: float
    dt: float
    order: int = 8
    pml: int = 30  # CPML cells per side (the outermost order/2 of them are held at zero)
    # devito-style damping layer ("bcs='damp'": a term damp(x)·u_t) of ``sponge`` cells between
    # the model and the CPML, with devito's profile for a layer ``sponge_width`` metres wide
    sponge: int = 0
    sponge_width: int = 350

    @property
    def pad(self) -> int:
        """Cells added on every side of the model (sponge + CPML)."""
        return self.sponge + self.pml


MODES = {
    "full": Mode(dx=1.0, dt=1e-4, order=8, pml=30),
    "fast": Mode(dx=4.0, dt=4e-4, order=8, pml=16),
}


# ----------------------------------------------------------------------------- stencils


def second_derivative_coeffs(order: int) -> np.ndarray:
    """Central 2nd-derivative weights c_0..c_r (r = order/2) on a unit grid."""
    if order < 2 or order % 2:
        raise ValueError(f"FD order must be an even number >= 2, got {order}")
    r = order // 2
    c = np.zeros(r + 1)
    for k in range(1, r + 1):
        c[k] = (
            2.0
            * (-1) ** (k + 1)
            * math.factorial(r) ** 2
            / (k * k * math.factorial(r - k) * math.factorial(r + k))
        )
    c[0] = -2.0 * c[1:].sum()
    return c


def first_derivative_coeffs(order: int) -> np.ndarray:
    """Central 1st-derivative weights d_1..d_r (antisymmetric: d_{-k} = -d_k) on a unit grid."""
    r = order // 2
    return np.array(
        [
            (-1) ** (k + 1)
            * math.factorial(r) ** 2
            / (k * math.factorial(r - k) * math.factorial(r + k))
            for k in range(1, r + 1)
        ]
    )


def cfl_limit(order: int) -> float:
    """Largest stable Courant number v·dt/dx of the 2-D leapfrog scheme with this stencil."""
    c = second_derivative_coeffs(order)
    nyquist = -(c[0] + 2.0 * sum(c[k] * (-1) ** k for k in range(1, len(c))))  # 1-D symbol at π
    return 2.0 / math.sqrt(2.0 * nyquist)


def check_cfl(v_max: float, mode: Mode) -> float:
    """Return the Courant number, or raise CFLError naming the fix."""
    courant = float(v_max) * 1e3 * mode.dt / mode.dx
    limit = cfl_limit(mode.order)
    if courant > limit:
        dt_max = limit * mode.dx / (float(v_max) * 1e3)
        raise CFLError(
            f"CFL violated: v_max={float(v_max):.3f} km/s, dx={mode.dx} m, dt={mode.dt} s gives "
            "Courant number "
            f"{courant:.3f} > {limit:.3f} (order-{mode.order} leapfrog limit). Use dt <= "
            f"{dt_max:.3g} s, a larger dx "
            "or clip the velocity model."
        )
    return courant


def ricker(t: np.ndarray | jax.Array, f0: float = F0, t0: float | None = None):
    """Ricker wavelet (peak 1 at t0 = 1.5/f0 by default); t in seconds."""
    t0 = 1.5 / f0 if t0 is None else t0
    a = (jnp.pi * f0 * (t - t0)) ** 2
    return (1.0 - 2.0 * a) * jnp.exp(-a)


# ----------------------------------------------------------------------------- geometry


def lagrange_weights(pos: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """4-point Lagrange interpolation of positions ``pos`` (in cells) on a 1-D grid of n points.

    Returns indices (P, 4) int32 and weights (P, 4) float64; on-grid points get weight 1 at their
    node (and 0 elsewhere), so the full mode injects and records at exact nodes.
    """
    pos = np.asarray(pos, np.float64)
    i0 = np.floor(pos).astype(np.int64)
    on = np.isclose(pos, np.round(pos), atol=1e-9)
    i0 = np.where(on, np.round(pos).astype(np.int64), i0)
    s = pos - i0  # in [0, 1)
    idx = i0[:, None] + np.arange(-1, 3)[None, :]
    nodes = np.arange(-1, 3, dtype=np.float64)
    w = np.ones((len(pos), 4))
    for j in range(4):
        for m in range(4):
            if m != j:
                w[:, j] *= (s - nodes[m]) / (nodes[j] - nodes[m])
    w = np.where(on[:, None], (nodes[None, :] == 0).astype(np.float64), w)
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"point at cell position {pos} is too close to the grid edge (n={n})")
    return idx.astype(np.int32), w


@dataclasses.dataclass(frozen=True)
class Survey:
    """Sources and receivers in metres (x from the model's first column, z below the surface)."""

    source_x: tuple[float, ...] = SOURCE_X
    source_z: float = SOURCE_Z
    receiver_x: tuple[float, ...] = RECEIVER_X
    receiver_z: float = RECEIVER_Z


def _point_stencils(xs, z, dx, pml, nx_pad, nz_pad):
    """Separable weights for points (xs, z) on the padded grid: idx_x, w_x, idx_z, w_z."""
    ix, wx = lagrange_weights(np.asarray(xs) / dx + pml, nx_pad)
    iz, wz = lagrange_weights(np.full(len(xs), z / dx + pml), nz_pad)
    return ix, wx, iz, wz


# ----------------------------------------------------------------------------- model on the grid


def resample_model(v: jax.Array, dx: float, model_dx: float = MODEL_DX) -> jax.Array:
    """Velocity (nx, nz) on a ``model_dx`` grid -> the ``dx`` grid that covers the same extent.

    Node j of the new grid sits at j·dx; its value is the constant-density Backus average
    1/√mean(1/v²) over a box of width dx around it (linear maps, so it is differentiable).
    """
    ratio = dx / model_dx
    if abs(ratio - 1.0) < 1e-12:
        return v

    def box(n_in: int) -> np.ndarray:
        n_out = int(math.floor((n_in - 1) / ratio + 1e-9)) + 1
        centres = np.arange(n_out) * ratio
        x = np.arange(n_in)
        # overlap of [x-1/2, x+1/2] with [c-ratio/2, c+ratio/2], clipped to the model
        lo = np.maximum(x[None, :] - 0.5, centres[:, None] - ratio / 2)
        hi = np.minimum(x[None, :] + 0.5, centres[:, None] + ratio / 2)
        w = np.clip(hi - lo, 0.0, None)
        return (w / w.sum(1, keepdims=True)).astype(np.float32)

    bx, bz = box(v.shape[0]), box(v.shape[1])
    slowness2 = 1.0 / (v * v)
    return 1.0 / jnp.sqrt(jnp.einsum("ix,xz,jz->ij", bx, slowness2, bz))


def _pml_profile(
    npml: int,
    dx: float,
    dt: float,
    v_max,
    f0: float,
    reflection: float = PML_REFLECTION,
    alpha_scale: float = PML_ALPHA,
    power: float = PML_POWER,
):
    """CPML a, b for cells 0..npml-1 of a left strip (cell 0 outermost). Shapes (npml,)."""
    length = npml * dx
    frac = (npml - jnp.arange(npml, dtype=jnp.float32)) / npml  # 1 at the outer edge -> 1/npml
    d0 = -(power + 1) * v_max * 1e3 * math.log(reflection) / (2.0 * length)
    d = d0 * frac**power
    alpha = alpha_scale * jnp.pi * f0 * (1.0 - frac)
    b = jnp.exp(-(d + alpha) * dt)
    a = d / (d + alpha) * (b - 1.0)
    return a.astype(jnp.float32), b.astype(jnp.float32)


def sponge_profile(n_model: int, mode: Mode) -> np.ndarray:
    """Devito's damping coefficient (1/m) along one padded axis of n_model + 2·pad cells.

    Devito (examples/seismic/model.py, ``initialize_damp``) sets, in a layer of W cells of 1 m,
    at d metres outside the model: pos = (d + 1)/W, damp = 1.5·ln(1000)/W · (pos −
    sin(2π·pos)/(2π)) per metre. Here cell j (j = 0 adjacent to the model) is d = (j + 1)·dx
    metres out; the CPML beyond the ``sponge`` cells has no damping term.
    """
    w = mode.sponge_width
    out = np.zeros(n_model + 2 * mode.pad)
    if mode.sponge == 0:
        return out
    d = (np.arange(mode.pad) + 1) * mode.dx
    pos = np.minimum(d + 1, w + 1) / w
    val = 1.5 * math.log(1000.0) / w * (pos - np.sin(2 * np.pi * pos) / (2 * np.pi))
    val[mode.sponge :] = 0.0
    out[: mode.pad] = val[::-1]
    out[mode.pad + n_model :] = val
    return out


# ----------------------------------------------------------------------------- propagator


def _shift(u, k, axis, n_out, r):
    """u[r+k : r+k+n_out] along ``axis`` (a static slice)."""
    return jax.lax.slice_in_dim(u, r + k, r + k + n_out, axis=axis)


class _Scheme:
    """The leapfrog of one padded model: ``carry0`` (w, u, CPML memory), ``step(carry, rows, cols,
    vals)`` (one time step with ``vals`` added to w at the points (rows, cols) of w's grid; vals
    already carry the Courant factor) and ``r`` (the stencil half-width: w's row 0 is u's row r)."""

    def __init__(self, v: jax.Array, mode: Mode, f0: float):
        order, npml, dt, dx = mode.order, mode.pml, mode.dt, mode.dx
        r = order // 2
        c2 = second_derivative_coeffs(order).astype(np.float32)
        d1 = first_derivative_coeffs(order).astype(np.float32)
        nx, nz = v.shape
        mx, mz = nx - 2 * r, nz - 2 * r  # updated cells; the outer r on each side stay 0
        p = npml - r  # CPML cells in each updated strip
        v_max = jax.lax.stop_gradient(jnp.max(v))
        a_l, b_l = _pml_profile(npml, dx, dt, v_max, f0)
        a_l, b_l = a_l[r:], b_l[r:]  # the strips' cells that are updated
        a_r, b_r = a_l[::-1], b_l[::-1]
        courant2 = ((v * (1e3 * dt / dx)) ** 2).astype(jnp.float32)
        if mode.sponge:
            # m·u_tt − ∇²u + damp·u_t = 0 with a centred u_t: w ← a·w + b·c²∇²u, η = damp·v²·dt/2
            dx_ = sponge_profile(nx - 2 * mode.pad, mode)
            dz_ = sponge_profile(nz - 2 * mode.pad, mode)
            damp = jnp.asarray((dx_[:, None] + dz_[None, :]).astype(np.float32))
            eta = damp * v**2 * (dt * 1e3 / 2.0)  # v in m/ms, dt in ms
            damp_a = ((1.0 - eta) / (1.0 + eta))[r : nx - r]
            damp_b = (1.0 / (1.0 + eta))[r : nx - r]

        def laplacian(u):  # (nx, nz) -> (mx, mz), dimensionless (grid units)
            out = (2.0 * c2[0]) * _shift(_shift(u, 0, 0, mx, r), 0, 1, mz, r)
            for k in range(1, r + 1):
                ux = _shift(u, 0, 1, mz, r)
                uz = _shift(u, 0, 0, mx, r)
                out = out + c2[k] * (_shift(ux, k, 0, mx, r) + _shift(ux, -k, 0, mx, r))
                out = out + c2[k] * (_shift(uz, k, 1, mz, r) + _shift(uz, -k, 1, mz, r))
            return out

        def d_first(w, axis, n_out):
            """Central 1st derivative of w (already padded by r along ``axis``) -> n_out cells."""
            out = 0.0
            for k in range(1, r + 1):
                out = out + d1[k - 1] * (
                    _shift(w, k, axis, n_out, r) - _shift(w, -k, axis, n_out, r)
                )
            return out

        def strip_terms(ustrip, psi, zeta, lap_strip, a, b, axis):
            """CPML correction in one strip. ustrip: u over the strip + r cells each side along
            axis."""
            n = psi.shape[axis]
            shape = [1, 1]
            shape[axis] = n
            a, b = a.reshape(shape), b.reshape(shape)
            du = d_first(ustrip, axis, n)
            psi = b * psi + a * du
            pad = [(0, 0), (0, 0)]
            pad[axis] = (r, r)
            dpsi = d_first(jnp.pad(psi, pad), axis, n)
            zeta = b * zeta + a * (lap_strip + dpsi)
            return psi, zeta, dpsi + zeta

        def d2_axis(u, axis, region):  # second derivative along one axis only, for the strip
            (x0, x1), (z0, z1) = region
            sub = u[
                x0 - r * (axis == 0) : x1 + r * (axis == 0),
                z0 - r * (axis == 1) : z1 + r * (axis == 1),
            ]
            n = (x1 - x0) if axis == 0 else (z1 - z0)
            out = c2[0] * _shift(sub, 0, axis, n, r)
            for k in range(1, r + 1):
                out = out + c2[k] * (_shift(sub, k, axis, n, r) + _shift(sub, -k, axis, n, r))
            return out

        # strips in padded-array coordinates (updated cells only)
        regions = {
            "xl": ((r, r + p), (r, nz - r)),
            "xr": ((nx - r - p, nx - r), (r, nz - r)),
            "zt": ((r, nx - r), (r, r + p)),
            "zb": ((r, nx - r), (nz - r - p, nz - r)),
        }
        profiles = {
            "xl": (a_l, b_l, 0),
            "xr": (a_r, b_r, 0),
            "zt": (a_l, b_l, 1),
            "zb": (a_r, b_r, 1),
        }

        c2strip = {name: courant2[x0:x1, z0:z1] for name, ((x0, x1), (z0, z1)) in regions.items()}
        if mode.sponge:
            # where a depth sponge crosses an x strip, the strip's terms are damped as the rest
            # of the update is (added undamped, the scheme grows without bound after ~0.5 s)
            c2strip = {
                name: c2 * damp_b[x0 - r : x1 - r, z0:z1]
                for (name, c2), ((x0, x1), (z0, z1)) in zip(c2strip.items(), regions.values())
            }
        # w lives on the updated rows r..nx-r-1 over all nz columns (its halo columns stay 0), so
        # that u += w updates whole rows: XLA's CPU dynamic-update-slice is ~4x slower on a 2-D
        # window
        c2rows = courant2[r : nx - r].at[:, :r].set(0.0).at[:, nz - r :].set(0.0)

        def step(carry, rows, cols, vals):
            # leapfrog in increment form: w = u(t) - u(t - dt) on the updated rows, so that
            # w += c²·(∇²u + CPML terms) and u += w update both wavefields in place (no rotation, no
            # full-grid copies; recording u after the update keeps XLA from copying it too)
            w, u, mem = carry
            new_mem = {}
            corr = {}
            for name, ((x0, x1), (z0, z1)) in regions.items():
                a, b, axis = profiles[name]
                ustrip = u[
                    x0 - r * (axis == 0) : x1 + r * (axis == 0),
                    z0 - r * (axis == 1) : z1 + r * (axis == 1),
                ]
                psi, zeta = mem[name]
                lap_axis = d2_axis(u, axis, ((x0, x1), (z0, z1)))
                psi, zeta, corr[name] = strip_terms(ustrip, psi, zeta, lap_axis, a, b, axis)
                new_mem[name] = (psi, zeta)
            # one pass over the grid: Laplacian + the depth strips' terms (narrow in the
            # contiguous axis, where a separate in-place add costs ~10x its size); the x strips are
            # added in place after
            lap_z = jnp.pad(corr["zt"], ((0, 0), (0, mz - p))) + jnp.pad(
                corr["zb"], ((0, 0), (mz - p, 0))
            )
            if mode.sponge:
                w = damp_a * w + damp_b * c2rows * jnp.pad(laplacian(u) + lap_z, ((0, 0), (r, r)))
            else:
                w = w + c2rows * jnp.pad(laplacian(u) + lap_z, ((0, 0), (r, r)))
            for name in ("xl", "xr"):
                (x0, x1), (z0, z1) = regions[name]
                w = w.at[x0 - r : x1 - r, z0:z1].add(c2strip[name] * corr[name])
            w = w.at[rows, cols].add(vals)
            u_new = u.at[r:-r, :].add(w)
            return (w, u_new, new_mem)

        mem0 = {
            name: (jnp.zeros((x1 - x0, z1 - z0), jnp.float32),) * 2
            for name, ((x0, x1), (z0, z1)) in regions.items()
        }
        self.carry0 = (jnp.zeros((mx, nz), jnp.float32), jnp.zeros((nx, nz), jnp.float32), mem0)
        self.step, self.r, self.courant2 = step, r, courant2


def _points(src_or_rec: tuple) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stencil points of P positions: rows (P, 4, 1), cols (P, 1, 4) and weights (P, 4, 4)."""
    ix, wx, iz, wz = (jnp.asarray(a) for a in src_or_rec)
    w = (wx[:, :, None] * wz[:, None, :]).astype(jnp.float32)
    return ix[:, :, None], iz[:, None, :], w


def _record(u: jax.Array, rec: tuple) -> jax.Array:
    """u at the receivers (R,) by their stencil weights."""
    rows, cols, w = rec
    return jnp.sum(u[rows, cols] * w, axis=(1, 2))


def propagate(
    v: jax.Array,
    src: tuple,
    rec: tuple,
    wavelet: jax.Array,
    *,
    mode: Mode,
    f0: float = F0,
    block: int = 50,
    unroll: int = 1,
    remat: bool = False,
    adjoint: bool = False,
) -> jax.Array:
    """One shot. v: (nx_pad, nz_pad) km/s on the padded grid; wavelet: (n_t,) source amplitude at
    each internal step. src/rec: (idx_x, w_x, idx_z, w_z) arrays (see ``_point_stencils``), one
    source and R receivers. Returns u at the receivers, (n_t, R) float32, sample n = u(t = n·dt).

    Gradients: by default JAX differentiates the time loop (exact for the discrete scheme; with
    ``remat`` each block of ``block`` steps is recomputed in the backward pass). ``adjoint=True``
    gives the adjoint-state gradient instead (``_adjoint_shot``; 5.8x faster on a 2-core CPU).
    """
    nt = wavelet.shape[0]
    nblocks = -(-nt // block)
    fs = jnp.pad(wavelet.astype(jnp.float32), (0, nblocks * block - nt)).reshape(nblocks, block)
    if adjoint:
        traces = _adjoint_shot(mode, f0, v, src, rec, fs.reshape(-1))
    else:
        traces = _forward_shot(v, src, rec, fs, mode=mode, f0=f0, unroll=unroll, remat=remat)
    # the scan records u((n + 1)·dt) at step n; u(0) = 0
    return jnp.concatenate([jnp.zeros_like(traces[:1]), traces[: nt - 1]])


def _forward_shot(v, src, rec, fs, *, mode, f0, unroll, remat):
    """Records (n_blocks·block, R) of one shot: step n records u((n + 1)·dt)."""
    scheme = _Scheme(v, mode, f0)
    r = scheme.r
    rows, cols, sw = _points(src)
    rows = rows - r  # w's rows
    amp = sw * scheme.courant2[rows + r, cols]
    rec = _points(rec)

    def step_rec(carry, f):
        carry = scheme.step(carry, rows, cols, amp * f)
        return carry, _record(carry[1], rec)

    def block_fn(carry, fs):  # ``block`` steps; the unit of rematerialisation
        return jax.lax.scan(step_rec, carry, fs, unroll=unroll)

    if remat:
        block_fn = jax.checkpoint(block_fn)
    _, traces = jax.lax.scan(block_fn, scheme.carry0, fs)
    return traces.reshape(-1, traces.shape[-1])


# The adjoint-state gradient, written by hand because JAX's own reverse pass through the time loop
# is slow on XLA:CPU (fast mode, five shots, 2 cores: 11.5 s per gradient against 2.0 s for this
# one, docs/performance.md §7). The method, the standard FWI gradient: one forward run that keeps
# ∂²u/∂t² every ``save_every`` steps, one backward-in-time run of the same scheme driven by the
# residuals, and their cross-correlation. It is exact for the interior scheme; inside the CPML the
# adjoint run uses the forward absorbing layer, not its transpose, so the padding cells get no
# gradient (their velocities only shape the absorption). Devito's damping layer (``Mode.sponge``)
# needs nothing more: its term damp·u_t is odd in time, so the damped scheme run backward in time
# is its own adjoint.

SAVE_DT = 1.6e-3  # s between the kept ∂²u/∂t² snapshots (≥ 6 per period at 2·40 Hz)


def _save_every(mode: Mode) -> int:
    return max(1, int(round(SAVE_DT / mode.dt)))


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _adjoint_shot(mode, f0, v, src, rec, fs):
    """Records (N, R) of one shot (as ``_forward_shot``, fs: (N,) wavelet), adjoint gradient."""
    return _adjoint_fwd(mode, f0, v, src, rec, fs)[0]


def _adjoint_fwd(mode, f0, v, src, rec, fs):
    k = _save_every(mode)
    n = fs.shape[0]
    nb = -(-n // k)
    fs_b = jnp.pad(fs, (0, nb * k - n)).reshape(nb, k)
    scheme = _Scheme(v, mode, f0)
    r = scheme.r
    rows, cols, sw = _points(src)
    amp = sw * scheme.courant2[rows, cols]
    rec_pts = _points(rec)

    def step_rec(carry, f):
        carry = scheme.step(carry, rows - r, cols, amp * f)
        return carry, _record(carry[1], rec_pts)

    def block_fn(carry, f):  # k steps; keeps w_n − w_{n−1} = u_{n+1} − 2u_n + u_{n−1} of the first
        w_before = carry[0]
        carry, rec0 = step_rec(carry, f[0])
        d2 = carry[0] - w_before
        carry, recs = jax.lax.scan(step_rec, carry, f[1:])
        return carry, (jnp.concatenate([rec0[None], recs]), d2)

    _, (traces, d2) = jax.lax.scan(block_fn, scheme.carry0, fs_b)
    traces = traces.reshape(nb * k, -1)[:n]
    return traces, (v, src, rec, fs, d2)


def _adjoint_bwd(mode, f0, res, g):
    v, src, rec, fs, d2 = res
    k = _save_every(mode)
    n = fs.shape[0]
    nb = d2.shape[0]
    scheme = _Scheme(v, mode, f0)
    r = scheme.r
    rows, cols, rw = _points(rec)
    amp = rw * scheme.courant2[rows, cols]  # (R, 4, 4)
    # adjoint step j is driven by g[n − 1 − j]; blocks in reverse, each reversed
    g_b = jnp.pad(g, ((0, nb * k - n), (0, 0))).reshape(nb, k, -1)[::-1, ::-1]

    def step(carry, gj):
        return scheme.step(carry, rows - r, cols, amp * gj[:, None, None]), None

    def block_fn(state, xs):
        carry, acc = state
        gk, d2b = xs
        carry, _ = jax.lax.scan(step, carry, gk)
        # after the block's last adjoint step the field is μ_{n+1} for the block's kept n
        return (carry, acc + carry[1][r:-r] * d2b), None

    acc0 = jnp.zeros_like(d2[0])
    (_, acc), _ = jax.lax.scan(block_fn, (scheme.carry0, acc0), (g_b, d2[::-1]))
    c2 = scheme.courant2[r:-r]
    # dJ/dC² = Σ μ_{n+1} D²u_n / C⁴ (μ = C²λ); dC²/dv = 2C²/v; the padding gets none (see above)
    grad = jnp.where(c2 > 0, 2.0 * k * acc / (c2 * v[r:-r]), 0.0)
    pad = mode.pad
    grad = jnp.pad(grad, ((r, r), (0, 0)))
    inside = np.zeros(v.shape, bool)
    inside[pad : v.shape[0] - pad, pad : v.shape[1] - pad] = True
    grad = jnp.where(inside, grad, 0.0)
    return grad, None, None, None


_adjoint_shot.defvjp(_adjoint_fwd, _adjoint_bwd)


def pad_model(v: jax.Array, npml: int) -> jax.Array:
    """Extend (nx, nz) by npml cells on every side, repeating the edge values."""
    return jnp.pad(v, npml, mode="edge")


def resample_time(traces: jax.Array, dt_in: float, dt_out: float, nt_out: int) -> jax.Array:
    """4-point Lagrange (cubic) interpolation along axis -2 from dt_in to dt_out sampling."""
    nt_in = traces.shape[-2]
    t = np.arange(nt_out) * dt_out / dt_in
    if t[-1] > nt_in - 1 + 1e-9:
        raise ValueError(
            f"internal run ({nt_in} steps of {dt_in} s) is shorter than the output ({nt_out} x "
            f"{dt_out} s)"
        )
    padded = jnp.concatenate(
        [traces[..., :1, :] * 0, traces, traces[..., -1:, :], traces[..., -1:, :]], axis=-2
    )
    idx, w = lagrange_weights(t + 1.0, nt_in + 3)
    gathered = padded[..., idx, :]  # (..., nt_out, 4, R)
    return jnp.einsum("...tkr,tk->...tr", gathered, w.astype(np.float32))


def interpolate_at(traces: jax.Array, dt_in: float, t: jax.Array) -> jax.Array:
    """``resample_time`` at traced times t (m,) s: the same 4-point Lagrange interpolation of
    traces (..., n, R) sampled every dt_in (sample k = time k·dt_in, zero before 0), its weights
    computed in the program, so that one compiled program serves any output clock."""
    n = traces.shape[-2]
    pos = t / dt_in + 1.0  # one zero sample in front
    i0 = jnp.clip(jnp.floor(pos).astype(jnp.int32), 1, n - 1)
    f = pos - i0
    w = jnp.stack(
        [
            -f * (f - 1) * (f - 2) / 6,
            (f + 1) * (f - 1) * (f - 2) / 2,
            -(f + 1) * f * (f - 2) / 2,
            (f + 1) * f * (f - 1) / 6,
        ],
        axis=-1,
    )
    padded = jnp.concatenate(
        [jnp.zeros_like(traces[..., :1, :]), traces, traces[..., -1:, :], traces[..., -1:, :]],
        axis=-2,
    )
    idx = i0[:, None] + jnp.arange(-1, 3)[None, :]
    return jnp.einsum("...tkr,tk->...tr", padded[..., idx, :], w)


@partial(
    jax.jit,
    static_argnames=(
        "mode",
        "survey",
        "f0",
        "t0",
        "out_dt",
        "out_nt",
        "amplitude",
        "block",
        "unroll",
        "remat",
        "adjoint",
        "model_dx",
        "shot_batch",
    ),
)
def simulate_shots(
    v: jax.Array,
    *,
    mode: Mode | str = "fast",
    survey: Survey = Survey(),
    f0: float = F0,
    t0: float | None = None,
    out_dt: float = OUT_DT,
    out_nt: int = OUT_NT,
    amplitude: float = 1.0,
    block: int = 50,
    unroll: int = 1,
    remat: bool = False,
    adjoint: bool = False,
    model_dx: float = MODEL_DX,
    shot_batch: int | None = None,
) -> jax.Array:
    """All shots of one velocity model. v: (nx, nz) km/s on the ``model_dx`` grid.

    The source is ``amplitude`` x a Ricker wavelet of peak frequency ``f0`` (Hz) peaking at ``t0``
    (s; default 1.5/f0). Returns (n_sources, out_nt, n_receivers) float32 sampled every ``out_dt``.
    Jittable (mode, survey and sizes are static); the CFL check needs a concrete ``v`` and runs in
    ``simulate``.
    """
    mode = MODES[mode] if isinstance(mode, str) else mode
    vg = resample_model(jnp.asarray(v, jnp.float32), mode.dx, model_dx)
    vp = pad_model(vg, mode.pad)
    nx_pad, nz_pad = vp.shape
    src = _point_stencils(survey.source_x, survey.source_z, mode.dx, mode.pad, nx_pad, nz_pad)
    rec = _point_stencils(survey.receiver_x, survey.receiver_z, mode.dx, mode.pad, nx_pad, nz_pad)
    step_ratio = out_dt / mode.dt
    t_end = (out_nt - 1) * out_dt
    nt = int(math.ceil(t_end / mode.dt - 1e-9)) + 1
    wavelet = amplitude * ricker(jnp.arange(nt, dtype=jnp.float32) * mode.dt, f0, t0)

    # vmap over shots: index arrays per shot are gathered inside the traced function
    src_j = tuple(jnp.asarray(a) for a in src)

    def one_traced(i):
        s = tuple(a[i][None] for a in src_j)
        return propagate(
            vp,
            s,
            rec,
            wavelet,
            mode=mode,
            f0=f0,
            block=block,
            unroll=unroll,
            remat=remat,
            adjoint=adjoint,
        )

    n_src = len(survey.source_x)
    # shots in chunks of ``shot_batch`` vmapped together (lax.map's batch_size): on a CPU one shot
    # of the full grid at a time keeps the wavefields in cache; small grids and GPUs want all.
    batch = n_src if shot_batch is None else max(1, min(shot_batch, n_src))
    traces = jax.lax.map(one_traced, jnp.arange(n_src), batch_size=batch)
    if abs(step_ratio - 1.0) > 1e-9:
        traces = resample_time(traces, mode.dt, out_dt, out_nt)
    else:
        traces = traces[:, :out_nt]
    return traces


def simulate(
    velocity: np.ndarray | jax.Array,
    *,
    mode: Mode | str = "fast",
    survey: Survey = Survey(),
    devices=None,
    model_batch: int | None = None,
    **kwargs,
) -> np.ndarray:
    """Shot gathers of a batch of models, sharded over devices along the batch axis.

    velocity: (B, nx, nz) km/s (or one (nx, nz) model). Returns (B, n_sources, out_nt,
    n_receivers) float32 as a NumPy array. The batch is padded to a multiple of the device count
    (by repeating the last model) and split with a ``jax.sharding.NamedSharding`` over a 1-D mesh
    ("models"); each device runs its models in chunks of ``model_batch`` vmapped together
    (``lax.map``'s batch_size; default: 1 on CPU, where one model at a time is faster because
    it stays in cache, all of them on GPU). Shots likewise (``shot_batch``, default 1 on CPU).
    Raises CFLError before compiling if the model is too fast for the mode's time step. ``kwargs``
    go to ``simulate_shots``.
    """
    mode = MODES[mode] if isinstance(mode, str) else mode
    v = np.asarray(velocity, np.float32)
    single = v.ndim == 2
    if single:
        v = v[None]
    if v.ndim != 3:
        raise ValueError(f"velocity must be (B, nx, nz) or (nx, nz), got shape {v.shape}")
    if not np.all(np.isfinite(v)) or v.min() <= 0:
        raise ValueError(
            f"velocity must be finite and positive (km/s); got min {np.nanmin(v)}, max "
            f"{np.nanmax(v)}"
        )
    check_cfl(float(v.max()), mode)
    devices = jax.devices() if devices is None else list(devices)
    n = len(v)
    n_pad = -(-n // len(devices)) * len(devices)
    if n_pad > n:
        v = np.concatenate([v, np.repeat(v[-1:], n_pad - n, axis=0)])
    mesh = jax.sharding.Mesh(np.array(devices), ("models",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("models"))
    on_cpu = devices[0].platform == "cpu"
    if model_batch is None:
        model_batch = 1 if on_cpu else n_pad
    model_batch = max(1, min(model_batch, n_pad // len(devices)))
    kwargs.setdefault("shot_batch", 1 if on_cpu else None)
    fn = _batch_fn(mesh, mode, survey, model_batch, tuple(sorted(kwargs.items())))
    out = np.asarray(fn(jax.device_put(v, sharding)))[:n]
    return out[0] if single else out


@functools.lru_cache(maxsize=32)
def _batch_fn(mesh, mode, survey, model_batch, kwargs):
    """jit(shard_map(lax.map(simulate_shots))) over the "models" axis, cached per configuration."""
    per_model = partial(simulate_shots, mode=mode, survey=survey, **dict(kwargs))

    def local(v):  # this device's models
        return jax.lax.map(per_model, v, batch_size=model_batch)

    spec = jax.sharding.PartitionSpec("models")
    # check_vma=False: the solver's scan carries start as unsharded zeros inside each shard
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))
