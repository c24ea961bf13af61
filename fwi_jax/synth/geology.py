"""Seeded synthetic velocity models (reference §6): (300, 1259) float32 km/s, axes (x, depth).

Every model has a water layer (≈1.5 km/s) over a sea floor at 200–350 m that slopes and curves,
then thin sedimentary layers whose velocity rises with depth towards 4.5 km/s. Families:

- ``layered``: folded and dipping layers;
- ``faulted``: the same plus 1–4 normal faults that offset the layers (hanging wall moved down);
- ``salt``: a fast (4.3–4.5 km/s) salt-like body with layers dragged up around it, sometimes faults.

Construction: a "paleo-depth" coordinate ζ(x, z) is built (depth below the sea floor, minus fold
and dip displacement, plus fault throws on hanging walls); each layer is a range of ζ with its
own velocity. NumPy only: generating a model costs far less than simulating its waves.
"""

from __future__ import annotations

import numpy as np

NX, NZ = 300, 1259  # cells of 1 m: x, depth
DX = 1.0  # m
V_MIN, V_MAX = 1.5, 4.5  # km/s
FAMILIES = ("layered", "faulted", "salt")


def _layer_stack(rng: np.random.Generator, depth_span: float) -> tuple[np.ndarray, np.ndarray]:
    """Layer tops (m of paleo-depth, increasing, first 0) and velocities (km/s) of a sediment
    column."""
    tops, vels = [0.0], []
    v_top = rng.uniform(1.6, 2.1)
    v_bottom = rng.uniform(3.6, 4.5)
    exponent = rng.uniform(0.6, 1.4)  # compaction trend shape
    while tops[-1] < depth_span:
        tops.append(tops[-1] + rng.choice([rng.uniform(4, 20), rng.uniform(20, 80)], p=[0.6, 0.4]))
    tops = np.array(tops[:-1])
    frac = np.clip(tops / depth_span, 0, 1) ** exponent
    vels = v_top + (v_bottom - v_top) * frac + rng.normal(0, 0.08, len(tops))
    # occasional slow layers (gas, overpressure) and fast stringers
    odd = rng.random(len(tops))
    vels = np.where(odd < 0.06, vels - rng.uniform(0.2, 0.5, len(tops)), vels)
    vels = np.where(odd > 0.96, vels + rng.uniform(0.2, 0.6, len(tops)), vels)
    return tops, np.clip(vels, 1.55, V_MAX)


def _sea_floor(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Sea-floor depth (m) at each x: a base level, a slope, a gentle curve and small
    undulations."""
    base = rng.uniform(200, 350)
    slope = rng.uniform(-0.25, 0.25)
    curve = rng.uniform(-40, 40)
    u = (x - x.mean()) / (x.max() - x.min())  # in [-0.5, 0.5]
    wiggle = sum(
        rng.uniform(0, 4) * np.sin(2 * np.pi * x / rng.uniform(60, 300) + rng.uniform(0, 2 * np.pi))
        for _ in range(2)
    )
    z = base + slope * (x - x.mean()) + curve * (4 * u**2 - 1 / 3) + wiggle
    return np.clip(z, 150, 420)


def _folds(rng: np.random.Generator, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Vertical displacement (m) of the layers: a regional dip plus folds whose amplitude varies
    with depth."""
    dip = np.tan(np.deg2rad(rng.uniform(-12, 12))) * (x[:, None] - x.mean())
    disp = np.broadcast_to(dip, (len(x), len(z))).copy()
    for _ in range(rng.integers(1, 4)):
        wavelength = rng.uniform(150, 900)
        amp = rng.uniform(0, 40)
        growth = rng.uniform(-0.5, 1.0)  # folds stronger (or weaker) with depth
        phase = rng.uniform(0, 2 * np.pi)
        depth_gain = 1 + growth * (z[None, :] / z.max())
        disp += amp * depth_gain * np.sin(2 * np.pi * x[:, None] / wavelength + phase)
    return disp


def _apply_faults(
    rng: np.random.Generator, zeta: np.ndarray, x: np.ndarray, z: np.ndarray, z_top: float, n: int
) -> None:
    """Normal faults in place: points on a fault's hanging wall move down by the throw (ζ
    decreases)."""
    X, Z = x[:, None], z[None, :]
    for _ in range(n):
        x0 = rng.uniform(20, 280)
        dip = np.deg2rad(rng.uniform(50, 75)) * rng.choice([-1, 1])
        throw = rng.uniform(10, 80)
        z_start = rng.uniform(z_top, z_top + 300)  # faults may die out upwards
        # fault plane: x = x0 + (z - z_start)/tan(dip); hanging wall is on the side the plane dips
        # to
        side = (X - x0 - (Z - z_start) / np.tan(dip)) * np.sign(dip)
        hanging = (side > 0) & (Z > z_start)
        taper = np.clip((Z - z_start) / 60.0, 0, 1)  # throw grows from the fault tip
        zeta -= np.where(hanging, throw * taper, 0.0)


def _salt(rng: np.random.Generator, x: np.ndarray, z: np.ndarray, z_floor: np.ndarray):
    """A salt-like body: a star-shaped blob (radius a smooth random function of angle). Returns
    mask, uplift."""
    X, Z = x[:, None], z[None, :]
    cx = rng.uniform(40, 260)
    cz = rng.uniform(z_floor.max() + 250, 1050)
    r0 = rng.uniform(40, 120)
    aspect = rng.uniform(0.6, 1.6)
    dx_, dz_ = (X - cx) / aspect, Z - cz
    theta = np.arctan2(dz_, dx_)
    radius = r0 * (
        1
        + sum(
            rng.uniform(0, 0.2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in range(1, 5)
        )
    )
    dist = np.hypot(dx_, dz_)
    mask = dist < radius
    # a stem rising towards the sea floor for some bodies (diapir)
    if rng.random() < 0.5:
        width = rng.uniform(15, 50)
        mask |= (
            (np.abs(X - cx) < width * (1 + 0.3 * np.sin(Z / 37.0)))
            & (Z < cz)
            & (Z > z_floor[:, None] + rng.uniform(80, 250))
        )
    uplift = rng.uniform(20, 90) * np.exp(-((np.maximum(dist - radius, 0) / 120.0) ** 2))
    return mask, uplift


def velocity_model(
    seed: int | np.random.SeedSequence | np.random.Generator, family: str = "layered"
) -> np.ndarray:
    """One model, (300, 1259) float32 km/s in [1.5, 4.5], axis 0 = x, axis 1 = depth; 1 m cells."""
    if family not in FAMILIES:
        raise ValueError(f"unknown velocity-model family {family!r}; choose from {FAMILIES}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    x = np.arange(NX) * DX
    z = np.arange(NZ) * DX
    z_floor = _sea_floor(rng, x)
    zeta = z[None, :] - z_floor[:, None] - _folds(rng, x, z)
    salt_mask = None
    if family == "faulted":
        _apply_faults(rng, zeta, x, z, float(z_floor.min()), int(rng.integers(1, 5)))
    elif family == "salt":
        salt_mask, uplift = _salt(rng, x, z, z_floor)
        zeta += uplift  # layers drag up against the body
        if rng.random() < 0.4:
            _apply_faults(rng, zeta, x, z, float(z_floor.min()), int(rng.integers(1, 3)))
    tops, vels = _layer_stack(rng, depth_span=NZ + 200.0)
    layer = np.clip(np.searchsorted(tops, zeta, side="right") - 1, 0, len(tops) - 1)
    v = vels[layer]
    # a gentle lateral velocity change within layers
    v = v * (1 + rng.uniform(-0.03, 0.03) * (x[:, None] - x.mean()) / x.max())
    if salt_mask is not None:
        v = np.where(salt_mask, rng.uniform(4.3, 4.5), v)
    water = z[None, :] < z_floor[:, None]
    v = np.where(water, rng.uniform(1.48, 1.52), v)
    return np.clip(v, V_MIN, V_MAX).astype(np.float32)


def sample_family(rng: np.random.Generator, families: tuple[str, ...]) -> str:
    """Pick one family uniformly (validates the names)."""
    for f in families:
        if f not in FAMILIES:
            raise ValueError(f"unknown velocity-model family {f!r}; choose from {FAMILIES}")
    return str(families[int(rng.integers(len(families)))])
