"""Physics in the loop: a label-free data misfit of velocity models, and waveform refinement.

The misfit of a velocity model v (300, 1259) (x, depth) km/s against the five observed shot
gathers d (5, 10001, 31) of its sample is the relative L2 norm

    misfit = ‖C(F(v)) − d‖₂ / ‖d‖₂   over t ∈ [0, t_max], all shots and receivers,

where F simulates the shots with the acoustic solver (``fwi_jax.synth``) and C is the dataset's
calibration (``python -m fwi_jax.synth calibrate``: polarity, scale and time shift of a generator
profile; without a calibration file the ``cpml8`` profile is used as it is, which fits data made
by ``python -m fwi_jax.synth``). It needs no ``vp_model.npy``, so it scores any prediction.
The ``devito`` profile runs on ``profiles.devito_solver_mode`` (fast: a 6 m grid) with each
model's recipe clock (``profiles.devito_shots``).

Refinement (``refine``) is full-waveform inversion started from a prediction: the gradient of the
misfit through the calibration's solver (fast mode by default; the adjoint-state gradient of
``wave._adjoint_shot`` by default, or ``jax.grad`` with rematerialised time blocks), in stages of
low-pass cutoff applied to both simulated and observed traces (default: one full-band stage), a
total-variation term, a depth gain on the gradient, L-BFGS directions (or momentum) whose largest
cell moves ``lr`` km/s, iterates kept in ``v_range`` widened below by ``undershoot``, the result
clipped to ``v_range``, and samples vmapped in batches. A refined model whose full-band misfit is
not below the start's is replaced by the start (``kept`` = "start").

CLIs: ``python -m fwi_jax.physics --data DIR --pred SUB.npz`` (misfit of each prediction, CSV);
``python -m fwi_jax.refine`` (refinement); ``python -m fwi_jax.infer ... --misfit``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import pathlib
import sys
from collections.abc import Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fwi_jax import cli
from fwi_jax.data import io
from fwi_jax.synth import profiles, wave
from fwi_jax.synth.calibrate import CALIBRATION_FILE, Calibration, CalibrationError

V_RANGE = (1.5, 4.5)  # km/s, the competition's velocity range
DEFAULT_STAGES = ((None, 20),)  # (low-pass cutoff Hz or None = full band, iterations), ...


class PhysicsError(ValueError):
    """Bad input to the misfit or the refinement; the message names the file or setting."""


# Calibration field -> the Forward field that holds it
_CALIBRATION_FIELDS = {
    "profile": "profile",
    "mode": "mode_name",
    "polarity": "polarity",
    "scale": "scale",
    "shift": "shift",
}


@dataclasses.dataclass(frozen=True)
class Forward:
    """Simulated shots comparable with a dataset's: solver settings plus its calibration.

    ``t_max`` (s) limits the time window used (1 s: every sample of the files); ``survey`` and
    ``model_dx`` describe the geometry (the profile's own by default; reduced ones in tests).

    The ``devito`` profile is differentiated on ``profiles.devito_solver_mode`` (``mode_name``:
    "fast", a 6 m 4th-order grid, or "full", the profile's 2 m grid) with a time step stable up
    to ``v_bound`` km/s; its traces follow the recipe's clock of each model (``clock``).
    """

    profile: str = "cpml8"
    mode_name: str = "fast"  # solver mode (cpml8: wave.MODES; devito: profiles.DEVITO_GRIDS)
    polarity: int = 1
    scale: float = 1.0
    shift: int = 0  # output samples; see fwi_jax.synth.calibrate
    t_max: float = 1.0
    survey: wave.Survey | None = None  # None: the profile's receivers and sources
    model_dx: float = wave.MODEL_DX
    block: int = 100  # time steps per rematerialised block of the gradient
    mode_override: wave.Mode | None = None  # a custom solver grid (tests)
    v_bound: float = V_RANGE[1]  # devito: the fastest velocity its solver's step must hold

    @classmethod
    def from_calibration(cls, cal: Calibration, **kwargs) -> Forward:
        return cls(**{f: getattr(cal, c) for c, f in _CALIBRATION_FIELDS.items()}, **kwargs)

    @property
    def calibration(self) -> Calibration:
        return Calibration(**{c: getattr(self, f) for c, f in _CALIBRATION_FIELDS.items()})

    @property
    def n_t(self) -> int:
        """Output samples used (0.1 ms apart)."""
        return round(self.t_max / wave.OUT_DT) + 1

    @property
    def devito(self) -> bool:
        return self.profile == "devito"

    @property
    def mode(self) -> wave.Mode:
        """The solver grid (for devito: at the step that holds ``v_bound``)."""
        if self.mode_override:
            return self.mode_override
        if self.devito:
            return profiles.devito_solver_mode(self.v_bound, self.mode_name)
        return wave.MODES[self.mode_name]

    @property
    def geometry(self) -> wave.Survey:
        if self.survey is not None:
            return self.survey
        return profiles.DEVITO_SURVEY if self.devito else wave.Survey()

    def check(self) -> Forward:
        if not 0 < self.t_max <= (wave.OUT_NT - 1) * wave.OUT_DT:
            raise PhysicsError(f"t_max {self.t_max} s: must be in (0, 1] s")
        profiles.check_profile(self.calibration.profile)
        modes = profiles.DEVITO_GRIDS if self.devito else wave.MODES
        if self.mode_override is None and self.mode_name not in modes:
            raise PhysicsError(
                f"mode {self.mode_name!r}: the {self.profile} profile has modes {tuple(modes)}"
            )
        return self

    def clock(self, v: np.ndarray) -> np.ndarray:
        """The devito recipe's clock of a model (nx, nz) (``profiles.recipe_clock``; its step
        follows the model's top speed as the generator's did); zeros for cpml8, which ignores it."""
        if not self.devito:
            return np.zeros(2, np.float32)
        return profiles.recipe_clock(float(np.max(v)))

    def simulate(self, v: np.ndarray) -> np.ndarray:
        """(nx, nz) km/s -> calibrated gathers (n_src, n_t, R) float32 (any profile, no grad)."""
        v = np.asarray(v, np.float32)
        fwd = self
        if self.devito and float(v.max()) > self.v_bound:  # a step that holds this model
            fwd = dataclasses.replace(self, v_bound=math.ceil(float(v.max()) * 4) / 4)
        return np.asarray(_traces_jit(fwd, jnp.asarray(v), jnp.asarray(self.clock(v))))

    def traces(
        self,
        v: jax.Array,
        clock: jax.Array | None = None,
        remat: bool = False,
        adjoint: bool = False,
    ) -> jax.Array:
        """Differentiable calibrated gathers (n_src, n_t, R) of one model (nx, nz) km/s;
        ``clock``: ``self.clock(v)`` of the model whose recipe the data followed (devito only).
        Gradient: JAX's through the time loop (``remat``: blocks recomputed), or the
        adjoint-state one (``adjoint``; ``wave._adjoint_shot``), 5.8x faster on a 2-core CPU."""
        c = self.calibration
        kwargs = dict(
            survey=self.geometry,
            model_dx=self.model_dx,
            block=self.block,
            remat=remat,
            adjoint=adjoint,
            shot_batch=1 if jax.default_backend() == "cpu" else None,
        )
        if self.devito:
            if clock is None:
                raise ValueError("the devito profile's traces need the recipe clock")
            sim = profiles.devito_shots(
                v, clock, v_max=self.v_bound, keep=self.n_t, solver=self.mode, **kwargs
            )
        else:
            sim = wave.simulate_shots(
                v,
                mode=self.mode,
                amplitude=profiles.DATA_AMPLITUDE,
                out_nt=self.n_t,
                **kwargs,
            )
        return (c.polarity * c.scale) * _shift(sim, c.shift)


@partial(jax.jit, static_argnums=0)
def _traces_jit(forward: Forward, v: jax.Array, clock: jax.Array) -> jax.Array:
    return forward.traces(v, clock)


def _shift(x: jax.Array, k: int) -> jax.Array:
    """x delayed by k samples along axis -2 (k < 0: advanced), zeros shifted in."""
    if k == 0:
        return x
    n = x.shape[-2]
    zeros = jnp.zeros((*x.shape[:-2], abs(k), x.shape[-1]), x.dtype)
    if k > 0:
        return jnp.concatenate([zeros, x[..., : n - k, :]], axis=-2)
    return jnp.concatenate([x[..., -k:, :], zeros], axis=-2)


def load_forward(
    data_dir: pathlib.Path, calibration: str | pathlib.Path | None = None, **kwargs
) -> tuple[Forward, str]:
    """The Forward of a dataset: ``calibration`` (a file), else DIR/synth_calibration.json when it
    exists, else the uncalibrated cpml8 profile. Returns (forward, a line saying which)."""
    path = pathlib.Path(calibration).expanduser() if calibration else data_dir / CALIBRATION_FILE
    if calibration or path.is_file():
        try:
            cal = Calibration.load(path)
        except CalibrationError as e:
            raise PhysicsError(str(e)) from None
        what = f"calibration {path} ({cal.profile} {cal.mode}, shift {cal.shift:+d})"
    else:
        cal = Calibration(profile="cpml8", mode="fast")
        what = f"no calibration file in {data_dir}: uncalibrated cpml8 profile"
    mode = kwargs.pop("mode", None)
    if mode:
        cal = dataclasses.replace(cal, mode=mode)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return Forward.from_calibration(cal, **kwargs).check(), what


def read_observed(folder: pathlib.Path) -> np.ndarray:
    """The raw shot gathers of a sample folder, (5, 10001, 31) float32 (files' amplitude)."""
    return np.stack(
        [io._load_array(folder / f, (io.N_TIME_RAW, io.N_RECEIVERS)) for f in io.SHOT_FILES]
    )


def relative_misfit(sim, obs) -> float:
    """‖sim − obs‖₂ / ‖obs‖₂ over every axis (float64 on the host)."""
    sim, obs = np.asarray(sim, np.float64), np.asarray(obs, np.float64)
    return float(np.linalg.norm(sim - obs) / max(np.linalg.norm(obs), 1e-30))


def misfit(forward: Forward, v: np.ndarray, observed: np.ndarray) -> float:
    """Relative L2 misfit of velocity v (nx, nz) km/s against observed gathers (5, ≥ n_t, R)."""
    return relative_misfit(forward.simulate(v), np.asarray(observed)[:, : forward.n_t])


def score_submission(
    data_dir, predictions: Mapping[str, np.ndarray], forward: Forward, *, progress: bool = True
) -> dict[str, dict[str, float]]:
    """{id: {"misfit": ..., "mape": ... (when vp_model.npy exists)}} of (x, depth) predictions."""
    from tqdm.auto import tqdm

    from fwi_jax.loss import competition_mape

    root = pathlib.Path(data_dir)
    out = {}
    for sid in tqdm(list(predictions), desc="misfit", unit="sample", disable=not progress):
        folder = root / sid
        if not folder.is_dir():
            raise PhysicsError(f"{folder}: no sample folder for prediction {sid!r}")
        v = np.asarray(predictions[sid], np.float32)
        _check_cfl(v, forward, sid)
        row = {"misfit": misfit(forward, v, read_observed(folder))}
        if (folder / io.VELOCITY_FILE).is_file():
            row["mape"] = competition_mape(
                io._load_array(folder / io.VELOCITY_FILE, io.VELOCITY_FILE_SHAPE), v
            )
        out[sid] = row
    return out


def _check_cfl(v: np.ndarray, forward: Forward, sid: str) -> None:
    if not np.all(np.isfinite(v)) or v.min() <= 0:
        raise PhysicsError(f"prediction {sid!r}: velocities must be finite and positive")
    if not forward.devito:  # the devito profile's step follows the model
        try:
            wave.check_cfl(float(v.max()), forward.mode)
        except wave.CFLError as e:
            raise PhysicsError(f"prediction {sid!r}: {e}") from None


def write_csv(path: pathlib.Path, rows: Mapping[str, Mapping[str, object]]) -> None:
    """One line per sample: id and every column any row has (empty where a row lacks it)."""
    cols = list(dict.fromkeys(k for r in rows.values() for k in r))

    def fmt(x):
        return "" if x is None else (f"{x:.8g}" if isinstance(x, float) else str(x))

    lines = [",".join(["id", *cols])] + [
        ",".join([sid, *(fmt(r.get(c)) for c in cols)]) for sid, r in rows.items()
    ]
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- refinement


def lowpass(x: jax.Array, cutoff_hz: float | None, dt: float = wave.OUT_DT) -> jax.Array:
    """Zero-phase low-pass along axis -2: gain 1/√(1 + (f/cutoff)⁸) (a 4th-order Butterworth's
    magnitude, applied both ways). The trace is zero-padded to twice its length first."""
    if cutoff_hz is None:
        return x
    n = x.shape[-2]
    f = np.fft.rfftfreq(2 * n, dt)
    gain = jnp.asarray(1.0 / np.sqrt(1.0 + (f / cutoff_hz) ** 8), jnp.float32)
    spec = jnp.fft.rfft(x, 2 * n, axis=-2) * gain[:, None]
    return jnp.fft.irfft(spec, 2 * n, axis=-2)[..., :n, :]


def total_variation(v: jax.Array, eps: float = 1e-3) -> jax.Array:
    """Mean √(∂ₓv² + ∂_zv² + ε²) in km/s per cell (a smooth isotropic TV). v: (nx, nz)."""
    gx = v[1:, :-1] - v[:-1, :-1]
    gz = v[:-1, 1:] - v[:-1, :-1]
    return jnp.mean(jnp.sqrt(gx * gx + gz * gz + eps * eps))


def normalize_by_max() -> optax.GradientTransformation:
    """Scale each update by 1/max|update| (per sample: vmapped), so ``learning_rate`` is the
    largest velocity change per step in km/s: the usual FWI step rule, which optax lacks."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: g / (jnp.max(jnp.abs(g)) + 1e-30), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


@dataclasses.dataclass(frozen=True)
class RefineConfig:
    """stages: ((cutoff Hz or None, iterations), ...); lr: largest step in km/s; tv: weight of
    the total-variation term; method: "lbfgs" (L-BFGS directions from the stage's last
    ``memory`` steps) or "momentum" (the gradient with ``momentum``); v_range: (lo, hi) km/s
    of the result; undershoot: km/s that iterates may go below lo (the result is clipped to
    v_range; clipping every iterate at lo keeps only the positive side lobe of a band-limited
    update near a layer at lo, which biases it upwards); gradient: "adjoint" (adjoint-state)
    or "autodiff" (jax.grad through the time loop, exact for the discrete scheme, 5.8x slower
    on a 2-core CPU); depth_power: the gradient is multiplied by (depth cell + 1)^depth_power
    before the step is scaled (the deep part's gradient is weak: geometric spreading)."""

    stages: tuple = DEFAULT_STAGES
    lr: float = 0.02
    tv: float = 0.05
    method: str = "lbfgs"  # lbfgs (optax.scale_by_lbfgs) | momentum (SGD with momentum)
    memory: int = 5  # lbfgs: curvature pairs kept
    momentum: float = 0.5  # momentum: its coefficient
    v_range: tuple = V_RANGE
    undershoot: float = 0.2
    gradient: str = "adjoint"  # adjoint (adjoint-state) | autodiff (jax.grad through the loop)
    depth_power: float = 1.0

    @property
    def iterate_range(self) -> tuple[float, float]:
        """(lo − undershoot, hi): the bounds every iterate is projected onto."""
        return self.v_range[0] - self.undershoot, self.v_range[1]

    def check(self) -> RefineConfig:
        lo, hi = self.v_range
        if not 0 < lo < hi:
            raise PhysicsError(f"--v-range {lo} {hi}: need 0 < lo < hi (km/s)")
        if not 0 <= self.undershoot < lo:
            raise PhysicsError(
                f"--undershoot {self.undershoot}: need 0 <= undershoot < {lo} (the --v-range low "
                "bound), so that iterates stay positive"
            )
        if not self.stages or any(n < 0 or (c is not None and c <= 0) for c, n in self.stages):
            raise PhysicsError(
                f"--stages {self.stages}: need cutoff > 0 Hz (or full) and iterations >= 0"
            )
        if self.gradient not in ("adjoint", "autodiff"):
            raise PhysicsError(f"--gradient {self.gradient!r}: adjoint or autodiff")
        if self.method not in ("momentum", "lbfgs") or self.memory < 1:
            raise PhysicsError(
                f"--method {self.method!r} (memory {self.memory}): momentum or lbfgs, memory >= 1"
            )
        if self.lr <= 0 or self.tv < 0 or not 0 <= self.momentum < 1:
            raise PhysicsError(f"lr {self.lr} must be > 0, tv {self.tv} >= 0, momentum in [0, 1)")
        return self


def parse_stages(text: str) -> tuple:
    """ "6:6,10:6,full:8" -> ((6.0, 6), (10.0, 6), (None, 8))."""
    out = []
    for part in text.split(","):
        try:
            c, n = part.split(":")
            out.append((None if c.strip() == "full" else float(c), int(n)))
        except ValueError:
            raise PhysicsError(
                f"--stages {text!r}: expected CUTOFF_HZ:ITERS[,...] with "
                "CUTOFF_HZ a number or 'full', e.g. 6:6,10:6,full:8"
            ) from None
    return tuple(out)


def depth_gain(power: float) -> optax.GradientTransformation:
    """Multiply each update (..., nx, nz) by (depth cell + 1)^power (a depth preconditioner)."""

    def update(updates, state, params=None):
        del params
        if power == 0:
            return updates, state
        return jax.tree.map(
            lambda g: g * (jnp.arange(1, g.shape[-1] + 1, dtype=g.dtype) ** power), updates
        ), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: RefineConfig) -> optax.GradientTransformation:
    """Depth gain, then the direction (L-BFGS or momentum), then a step whose largest cell moves
    ``lr`` km/s. L-BFGS runs without a line search (each trial step would cost a forward run of
    every shot): its direction carries the curvature of the last steps, the cap sets the size."""
    if cfg.method == "lbfgs":
        return optax.chain(
            depth_gain(cfg.depth_power),
            optax.scale_by_lbfgs(int(cfg.memory)),
            normalize_by_max(),
            optax.sgd(cfg.lr),
        )
    return optax.chain(
        depth_gain(cfg.depth_power),
        normalize_by_max(),
        optax.sgd(cfg.lr, momentum=cfg.momentum or None),
    )


@functools.lru_cache(maxsize=16)
def make_stage_step(forward: Forward, cfg: RefineConfig, cutoff: float | None):
    """jit(vmap(one step)) for a batch: (v, opt_state, obs, clock) -> (v, opt_state, misfit
    before). Cached, so every batch of a run reuses the compiled step."""
    lo, hi = cfg.iterate_range
    optimizer = make_optimizer(cfg)

    def loss(v, obs_f, clock):
        adjoint = cfg.gradient == "adjoint"
        sim = lowpass(forward.traces(v, clock, remat=not adjoint, adjoint=adjoint), cutoff)
        rel2 = jnp.sum((sim - obs_f) ** 2) / jnp.maximum(jnp.sum(obs_f**2), 1e-30)
        return rel2 + cfg.tv * total_variation(v), jnp.sqrt(rel2)

    def step(v, state, obs_f, clock):
        (_, mis), g = jax.value_and_grad(loss, has_aux=True)(v, obs_f, clock)
        updates, state = optimizer.update(g, state, v)
        return jnp.clip(optax.apply_updates(v, updates), lo, hi), state, mis

    return jax.jit(jax.vmap(step))


@functools.lru_cache(maxsize=16)
def _batch_misfit(forward: Forward):
    """jit(vmap(relative misfit)) of a batch of models against their gathers, cached."""
    return jax.jit(
        jax.vmap(
            lambda v, o, clock: (
                jnp.linalg.norm(forward.traces(v, clock) - o)
                / jnp.maximum(jnp.linalg.norm(o), 1e-30)
            )
        )
    )


@dataclasses.dataclass
class RefineResult:
    velocity: np.ndarray  # (B, nx, nz) km/s
    misfit_before: np.ndarray  # (B,)
    misfit_after: np.ndarray  # (B,)
    kept: list  # "refined" | "start" per sample
    history: list  # per stage: (iterations, B) band-limited misfit before each step


def refine(
    forward: Forward,
    v0: np.ndarray,
    observed: np.ndarray,
    cfg: RefineConfig = RefineConfig(),
    *,
    progress=None,
) -> RefineResult:
    """Refine a batch of models v0 (B, nx, nz) km/s against observed gathers (B, 5, ≥ n_t, R).

    ``progress``: a callable advanced once per iteration (a tqdm bar's ``update``), or None.
    The devito profile's solver takes a step that holds ``v_range``'s upper bound, and each
    sample's recipe clock follows its start's top speed (the generator's step for that model)."""
    cfg.check()
    forward.check()
    lo, hi = cfg.v_range
    v = jnp.clip(jnp.asarray(v0, jnp.float32), lo, hi)
    obs = jnp.asarray(np.asarray(observed, np.float32)[:, :, : forward.n_t])
    if forward.devito:
        forward = dataclasses.replace(forward, v_bound=hi)
    else:
        try:
            wave.check_cfl(hi, forward.mode)  # every iterate stays below hi
        except wave.CFLError as e:
            raise PhysicsError(f"--v-range upper bound {hi} km/s: {e}") from None
    clock = jnp.asarray(np.stack([forward.clock(m) for m in np.asarray(v)]))
    batch_misfit = _batch_misfit(forward)
    before = np.asarray(batch_misfit(v, obs, clock), np.float64)
    optimizer = make_optimizer(cfg)
    history = []
    for cutoff, iters in cfg.stages:
        if iters == 0:
            continue
        step = make_stage_step(forward, cfg, cutoff)
        state = jax.vmap(optimizer.init)(v)  # momentum or curvature pairs restart with each band
        obs_f = jax.vmap(partial(lowpass, cutoff_hz=cutoff))(obs)
        seen = []
        for _ in range(iters):
            v, state, mis = step(v, state, obs_f, clock)
            seen.append(np.asarray(mis))
            if progress is not None:
                progress(1)
        history.append(np.stack(seen))
    v = jnp.clip(v, lo, hi)  # iterates may lie up to cfg.undershoot below lo
    after = np.asarray(batch_misfit(v, obs, clock), np.float64)
    better = after < before
    v_out = np.where(better[:, None, None], np.asarray(v), np.asarray(v0, np.float32))
    return RefineResult(
        velocity=v_out,
        misfit_before=before,
        misfit_after=np.where(better, after, before),
        kept=["refined" if b else "start" for b in better],
        history=history,
    )


# ----------------------------------------------------------------------------- CLI (scoring)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fwi_jax.physics",
        description="Data misfit of every prediction of a submission against "
        "the shot gathers of its data folder.",
    )
    ap.add_argument("--data", required=True, help="folder of sample folders (competition format)")
    ap.add_argument(
        "--pred", required=True, help="submission .npz (id -> (300, 1259) (x, depth) km/s)"
    )
    ap.add_argument("--csv", help="per-sample CSV to write (default: PRED with _misfit.csv)")
    add_forward_args(ap)
    ap.add_argument("--no-progress", action="store_true")
    return ap


def data_folder(data: str) -> pathlib.Path:
    """The ``--data`` folder of the misfit and refinement commands; ``PhysicsError`` if missing."""
    root = pathlib.Path(data).expanduser()
    if not root.is_dir():
        raise PhysicsError(f"--data {root}: folder does not exist")
    return root


def add_forward_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--calibration",
        help="calibration file (default DATA/synth_calibration.json if it "
        "exists, else the uncalibrated cpml8 profile)",
    )
    ap.add_argument(
        "--mode",
        choices=("fast", "full"),
        help="solver grid (default: the calibration's): cpml8 4 m | 1 m, devito 6 m | 2 m",
    )
    ap.add_argument(
        "--t-max", type=float, default=1.0, help="time window used, seconds (default 1)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        root = data_folder(args.data)
        forward, what = load_forward(root, args.calibration, mode=args.mode, t_max=args.t_max)
        pred_path = pathlib.Path(args.pred).expanduser()
        preds = io.read_submission(pred_path)
        csv = (
            pathlib.Path(args.csv).expanduser()
            if args.csv
            else pred_path.with_name(pred_path.stem + "_misfit.csv")
        )
        print(what)
        rows = score_submission(root, preds, forward, progress=not args.no_progress)
    except (PhysicsError, io.DataError) as e:
        return cli.fail(e)
    write_csv(csv, rows)
    print(
        f"mean misfit {np.mean([r['misfit'] for r in rows.values()]):.5f} over {len(rows)} samples "
        f"(per sample: {csv})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
