"""``python -m fwi_jax.train``: the reference recipe (reference §4-§5) under one ``jax.jit`` step.

    python -m fwi_jax.train --config base_s6 --data DIR [--train-list F --val-list F] --workdir W
    (DIR: sample folders, or a packed store from ``python -m fwi_jax.data pack``)
    python -m fwi_jax.train --config demo --workdir runs/demo          # synthetic data, 2 CPU cores
    python -m fwi_jax.train --config base_s6 ... --resume               # continue W exactly
    python -m fwi_jax.train --config base_s8 ... --load-from runs/s6 --drop-head   # fine-tune

One step (``make_train_step``) = forward + the config's loss + backward over the global batch
(optionally in ``grad_accum`` micro-batches), unscale and finiteness check (float16 loss scaling),
the optax update (skipped, with the loss scale halved, when a gradient is not finite), and the EMA.
The train state is a plain dict pytree {step, params, opt_state, ema, loss_scale}: replicated on a
1-D data mesh, donated to the step, saved by orbax with the loader state.

The work directory holds ``config.json`` (the resolved config), ``metrics.jsonl`` (one JSON object
per log line: train/loss, train/grad_norm, lr, loss_scale, samples_per_s, val/mape, and
``wall_s``, seconds since this process began training, validation included),
``checkpoints/<step>/`` (train state, newest ``train.keep_checkpoints``), ``best/`` (params
checkpoint of the best validation MAPE: the EMA weights once the EMA exists) and ``final/``.
``python -m fwi_jax.infer --checkpoints W`` reads ``best/``.

Randomness: initialisation from ``train.seed``; the shuffle and the flip augmentation from the
loader, seeded by (``train.seed``, sample index) and restored with its state. The step itself is
deterministic, so a resumed run repeats an uninterrupted one bit for bit on the same devices.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fwi_jax import sharding
from fwi_jax.checkpoint import CheckpointError, TrainCheckpoints, save_params
from fwi_jax.config import (
    Config,
    ConfigError,
    add_override_argument,
    from_dict,
    load_config,
)
from fwi_jax.host import tune_cpu_host
from fwi_jax.loss import get_loss, laplace_nll, mape_per_sample
from fwi_jax.model import create_model
from fwi_jax.optim import (
    LossScale,
    all_finite,
    ema_update,
    make_optimizer,
    uses_loss_scaling,
)
from fwi_jax.runlog import RunLog
from fwi_jax.storage import StorageError, require_writable, write_atomic

TRACES: collections.Counter = collections.Counter()  # how often each jitted function was traced
# a logged gradient norm below this means training has stalled for good (healthy runs log >= 1e-3):
# with the bounded head (sigmoid) this is a saturated output, typically from too high a learning
# rate
VANISHED_GRAD_NORM = 1e-7


class TrainError(ValueError):
    """A user error (data, config, checkpoint, work directory); the message says what to do."""


# exit status after a SIGTERM: the shell's "terminated by SIGTERM", so a scheduler does not count
# the run as finished; its checkpoint is saved and --resume continues it
PREEMPTED_EXIT = 128 + signal.SIGTERM


class Preempted(Exception):
    """Training stopped after ``step`` on SIGTERM (a scheduler's preemption), checkpoint saved."""

    def __init__(self, step: int, total: int, checkpoint: pathlib.Path):
        super().__init__(
            f"stopped by SIGTERM after step {step} of {total}; checkpoint {checkpoint} saved"
        )
        self.step, self.total, self.checkpoint = step, total, checkpoint


class _SigtermFlag:
    """While active, SIGTERM sets ``raised`` instead of killing the process, so the loop can
    finish its step and save. Only in a single process on the main thread: with several
    processes JAX's preemption service (``TrainCheckpoints.reached_preemption``) owns SIGTERM and
    makes every host stop at the same step."""

    def __init__(self):
        self.raised, self._previous = False, None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def restore(self) -> None:
        """Give SIGTERM back to the handler it had before."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# ---------------------------------------------------------------------------------------------
# Train state and the jitted step


def create_train_state(cfg: Config, params: Any, tx: optax.GradientTransformation) -> dict:
    """{step, params, opt_state, ema, loss_scale}; ``ema`` holds a copy of params until the EMA
    starts (it is only read once it has)."""
    params = jax.tree.map(jnp.asarray, params)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "ema": jax.tree.map(jnp.copy, params),
        "loss_scale": LossScale.create(uses_loss_scaling(cfg)),
    }


def make_train_step(
    cfg: Config,
    graphdef: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    ema_start_step: int,
) -> Callable:
    """Pure ``step(state, batch) -> (state, metrics)``; batch = {"x": (B, 6, T, R), "v": (B, depth,
    x)}. x may be float16 (a float16 packed store's batches): the model casts it to float32,
    exactly.

    With ``train.grad_accum = k`` the batch is cut into k micro-batches (sample i goes to
    micro-batch i mod k, so every device keeps its own samples) and their gradients averaged in a
    ``lax.scan``: one optimiser update per step, k times less activation memory. (optax.MultiSteps
    would instead make every call a micro-step and the schedule, EMA and logging count those.)"""
    from fwi_jax.model import apply_model

    loss_fn = get_loss(cfg.train.loss)
    accum = cfg.train.grad_accum

    nll_weight = cfg.train.nll_weight if cfg.model.error_head else 0.0

    def scaled_grads(params, x, v, scale):
        def f(p):
            if nll_weight:  # the error head's log-scale learns the relative error's scale
                pred, log_b = apply_model(graphdef, p, x, log_scale=True)
                loss = loss_fn(pred, v) + nll_weight * laplace_nll(log_b, pred, v)
            else:
                loss = loss_fn(apply_model(graphdef, p, x), v)
            return loss * scale, loss

        return jax.grad(f, has_aux=True)(params)

    def step(state: dict, batch: dict) -> tuple[dict, dict]:
        TRACES["train_step"] += 1
        params, ls = state["params"], state["loss_scale"]
        x, v = batch["x"], batch["v"]
        if accum == 1:
            grads, loss = scaled_grads(params, x, v, ls.scale)
        else:
            micro = lambda a: jnp.moveaxis(
                a.reshape(a.shape[0] // accum, accum, *a.shape[1:]), 1, 0
            )

            def body(carry, xv):
                g, l = scaled_grads(params, *xv, ls.scale)
                return jax.tree.map(jnp.add, carry, (g, l)), None

            zero = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
            (grads, loss), _ = jax.lax.scan(body, zero, (micro(x), micro(v)))
            grads, loss = jax.tree.map(lambda a: a / accum, (grads, loss))
        grads = jax.tree.map(lambda g: g / ls.scale, grads)
        finite = all_finite(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_params, opt_state = keep(new_params, params), keep(opt_state, state["opt_state"])
        ema = ema_update(
            state["ema"], params, new_params, state["step"], ema_start_step, cfg.train.ema_decay
        )
        new_ls = ls.adjust(finite)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]),
            "loss_scale": ls.scale,
            "skipped_steps": new_ls.skipped,
        }
        new_state = {
            "step": state["step"] + 1,
            "params": new_params,
            "opt_state": opt_state,
            "ema": ema,
            "loss_scale": new_ls,
        }
        return new_state, metrics

    return step


def abstract_train_step(cfg: Config, batch: int, platform: str | None = None):
    """``cfg``'s real train step with shapes only, for lowering, compiling or counting FLOPs
    without allocating anything: (the pure step, the train state's ``ShapeDtypeStruct``s, a batch
    {"x", "v"} of ``batch`` samples as ``ShapeDtypeStruct``s). The model is built for
    ``platform`` (`fwi_jax.model.abstract_model`); the EMA is active from step 0, so its work
    counts."""
    from fwi_jax.model import abstract_model

    graphdef, params = abstract_model(cfg, platform=platform)
    tx, schedule = make_optimizer(cfg, total_steps=1000)
    state = jax.eval_shape(lambda p: create_train_state(cfg, p, tx), params)
    g = cfg.geometry
    data = {
        "x": jax.ShapeDtypeStruct((batch, 6, g.n_time, g.n_receivers), jnp.float32),
        "v": jax.ShapeDtypeStruct((batch, *g.out_shape), jnp.float32),
    }
    return make_train_step(cfg, graphdef, tx, schedule, ema_start_step=0), state, data


def make_eval_step(graphdef: Any, tta: bool, flip_channels: bool = True) -> Callable:
    """Pure ``(params, x, v, mask) -> (sum of per-sample MAPE over mask, count, first row's
    prediction)``; x float32 or float16 (the model casts it to float32, exactly).
    ``flip_channels``: the config's flip TTA."""
    from fwi_jax.ensemble import member_predictions

    def evaluate(params, x, v, mask):
        TRACES["eval_step"] += 1
        pred = member_predictions(
            graphdef, jax.tree.map(lambda a: a[None], params), x, tta, flip_channels=flip_channels
        )[0]
        return jnp.sum(mape_per_sample(pred, v) * mask), jnp.sum(mask), pred[0]

    return evaluate


# ---------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class RunData:
    root: pathlib.Path
    train_ids: list[str]
    val_ids: list[str]
    test_ids: list[str] = dataclasses.field(default_factory=list)  # held out (synthetic data only)


def synthetic_dataset(cfg: Config, progress: bool = True) -> RunData:
    """The config's synthetic dataset (``cfg.synth``), made on first use and cached: ids
    0..n_train-1 of the seed train, the next n_val validate, the next n_test are held out. The
    simulator runs as a subprocess because it splits the CPU into several JAX devices, which must be
    set before JAX starts."""
    from fwi_jax.synth import is_complete, sample_id

    s = cfg.synth
    recipe = s.mode if s.profile == "cpml8" else s.profile
    root = pathlib.Path(s.cache_dir).expanduser() / f"s{s.seed}_{recipe}_{'-'.join(s.families)}"
    n = s.n_train + s.n_val + s.n_test
    ids = [sample_id(s.seed, i) for i in range(n)]
    if not all(is_complete(root / i) for i in ids):
        if jax.process_index() == 0:
            print(f"synthesising {n} samples into {root} (cached for later runs)", flush=True)
            cmd = [
                sys.executable,
                "-m",
                "fwi_jax.synth",
                "--n",
                str(n),
                "--out",
                str(root),
                "--seed",
                str(s.seed),
                "--mode",
                s.mode,
                "--profile",
                s.profile,
                *[a for f in s.families for a in ("--family", f)],
            ]
            if not progress:
                cmd.append("--no-progress")
            subprocess.run(cmd, check=True)
    return RunData(
        root, ids[: s.n_train], ids[s.n_train : s.n_train + s.n_val], ids[s.n_train + s.n_val :]
    )


def resolve_data(cfg: Config, progress: bool = True) -> RunData:
    """Sample folders or a packed store (``python -m fwi_jax.data pack``) and id lists from
    ``cfg.data`` (no lists: the reference's fold-0 split of every sample), or the synthetic
    dataset when ``data.root`` is empty."""
    from fwi_jax.data.io import DataError, list_samples  # folders or a packed store
    from fwi_jax.data.split import check_no_training_only, reference_split

    d = cfg.data
    if not d.root:
        if cfg.synth.n_train <= 0:
            raise TrainError(
                "no data: pass --data DIR (competition-format sample folders) or set "
                "synth.n_train > 0 to train on a synthetic dataset"
            )
        return synthetic_dataset(cfg, progress)
    try:
        root = pathlib.Path(d.root).expanduser()
        if d.train_list:
            train_ids = list_samples(root, d.train_list)
            val_ids = list_samples(root, d.val_list) if d.val_list else []
        else:
            train_ids, val_ids = reference_split(list_samples(root))
            if d.val_list:
                val_ids = list_samples(root, d.val_list)
        check_no_training_only(val_ids, d.val_list or "validation split")
    except (DataError, ValueError) as e:
        raise TrainError(str(e)) from None
    if not train_ids:
        raise TrainError(f"no training samples under {root}")
    return RunData(root, train_ids, val_ids)


def evaluate(
    eval_fn: Callable, params: Any, cfg: Config, data: RunData, mesh, batch_size: int
) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean per-sample MAPE over ``data.val_ids``, in whole global batches (one compiled shape;
    padded rows are masked out, ``fwi_jax.data.pipeline.host_batches``), and the first validation
    sample's truth and prediction (depth, x)."""
    from fwi_jax.data.pipeline import host_batches

    total, count, first = 0.0, 0.0, None
    for hb in host_batches(cfg, data.root, data.val_ids, batch_size=batch_size, velocity=True):
        g = sharding.host_to_global(mesh, hb)
        s, c, pred0 = eval_fn(params, g["x"], g["v"], g["mask"])
        if first is None:  # the prediction is replicated: every process may read it
            first = (np.asarray(hb["v"][0], np.float32), np.asarray(pred0))
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0), *first


# ---------------------------------------------------------------------------------------------
# Initial weights


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    return {
        jax.tree_util.keystr(p): tuple(np.shape(a))
        for p, a in jax.tree_util.tree_leaves_with_path(tree)
    }


def check_fits(params: Any, fresh: Any, source: str) -> None:
    """Raise TrainError listing every key whose presence or shape differs from ``fresh``."""
    have, want = _flat_shapes(params), _flat_shapes(fresh)
    problems = [f"  missing: {k}" for k in sorted(set(want) - set(have))]
    problems += [f"  unexpected: {k}" for k in sorted(set(have) - set(want))]
    problems += [
        f"  wrong shape: {k}: {have[k]} vs {want[k]}"
        for k in sorted(set(have) & set(want))
        if have[k] != want[k]
    ]
    if problems:
        raise TrainError(f"{source} does not fit this config's model:\n" + "\n".join(problems))


def initial_params(
    cfg: Config, fresh: Any, init_from: str | None, load_from: str | None, drop_head: bool
) -> Any:
    """``fresh`` params, or weights from ``--init-from`` (a timm EVA02 or reference PyTorch
    checkpoint, or one of our params checkpoints) or ``--load-from`` (another run; with
    ``drop_head`` its head is replaced by the fresh one, as the reference fine-tuned)."""
    from fwi_jax.members import MemberError, read_weights

    source = init_from or load_from
    if source is None:
        return fresh
    try:
        _, params = read_weights(source, cfg, seed=cfg.train.seed)
    except MemberError as e:
        raise TrainError(f"{'--init-from' if init_from else '--load-from'} {e}") from None
    if drop_head:
        params = dict(params)
        params["head"] = fresh["head"]
        for key in ERROR_HEAD_KEYS:
            if key in fresh:
                params[key] = fresh[key]
    # timm weights have no depth prior; weights of a network without the error head have none
    for key in ("depth_prior", *ERROR_HEAD_KEYS):
        if key in fresh and key not in params:
            params = {**params, key: fresh[key]}
    check_fits(params, fresh, str(pathlib.Path(source).expanduser()))
    return params


ERROR_HEAD_KEYS = ("error_head", "error_prior")  # model.error_head's parameters


PROFILE_SAMPLES = 512  # training samples averaged for the depth prior (the first ones listed)


def depth_profile(cfg: Config, data: RunData) -> np.ndarray:
    """(depth,) km/s: the mean velocity at each depth of the first `PROFILE_SAMPLES` training
    samples (read on every host alike, so every host starts with the same parameters)."""
    from fwi_jax.data.pipeline import host_batches

    ids = data.train_ids[:PROFILE_SAMPLES]
    total, count = np.zeros(cfg.geometry.out_shape[0]), 0.0
    for hb in host_batches(
        cfg, data.root, ids, batch_size=8, velocity=True, process_index=0, process_count=1
    ):
        total += np.einsum("b,bd->d", hb["mask"], hb["v"].mean(axis=-1, dtype=np.float64))
        count += float(hb["mask"].sum())
    return total / count


def with_depth_prior(cfg: Config, params: Any, profile: np.ndarray) -> Any:
    """``params`` with ``depth_prior`` set to the logits of ``profile`` (depth,) km/s under the
    output sigmoid (``model.v_min``, ``model.v_span``), so the untrained head's zero-centred output
    gives this profile."""
    m = cfg.model
    u = np.clip((profile - m.v_min) / m.v_span, 1e-3, 1 - 1e-3)
    return {**params, "depth_prior": np.log(u / (1 - u)).astype(np.float32)}


# ---------------------------------------------------------------------------------------------
# The loop


def _saved_config(path: pathlib.Path) -> dict | None:
    """A run's config.json as this code's config (fields added since, e.g. data.host_dtype, take
    their defaults); None when it no longer parses."""
    try:
        return json.loads(from_dict(json.loads(path.read_text())).to_json())
    except (ConfigError, TypeError, ValueError):
        return None


def train(
    cfg: Config,
    workdir: str | pathlib.Path,
    data: RunData | None = None,
    *,
    resume: bool = False,
    init_from: str | None = None,
    load_from: str | None = None,
    drop_head: bool = False,
    progress: bool = True,
    on_batch: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train ``cfg`` in ``workdir``; returns a summary {steps (those run, fewer than planned
    after an early stop), early_stopped, best_mape, final_mape, skipped_steps, traces}. With
    ``train.early_stop_patience`` N > 0 the run ends after N validations in a row above the best
    MAPE, with best/ and final/ written as at a normal end (the count is checkpointed, so a
    resumed run stops where an uninterrupted one does, and an early-stopped run resumes as
    finished). ``on_batch(step, host_batch)`` (optional) sees each batch this host
    read (its "id"s included) before it goes to the devices. On SIGTERM the current step finishes,
    a checkpoint is saved and `Preempted` is raised."""
    from fwi_jax.data.pipeline import make_loader

    tc = cfg.train
    workdir = require_writable(workdir, "--workdir")  # before any data loading or compiling
    main_host = jax.process_index() == 0
    data = data or resolve_data(cfg, progress)
    mesh = sharding.data_mesh()
    sharding.check_batch_divides(tc.batch_size, mesh)
    if tc.batch_size % tc.grad_accum or (tc.batch_size // tc.grad_accum) % mesh.devices.size:
        raise TrainError(
            f"train.batch_size={tc.batch_size} must split into train.grad_accum={tc.grad_accum} "
            f"micro-batches that are multiples of the {mesh.devices.size} devices"
        )
    steps_per_epoch = tc.steps_per_epoch or len(data.train_ids) // tc.batch_size
    if steps_per_epoch <= 0:
        raise TrainError(f"{len(data.train_ids)} training samples make no batch of {tc.batch_size}")
    total = tc.epochs * steps_per_epoch
    ema_start = tc.ema_start_epoch * steps_per_epoch

    ckpts = TrainCheckpoints(workdir / "checkpoints", keep=tc.keep_checkpoints)
    latest = ckpts.latest_step()
    if latest is not None and not resume:
        raise TrainError(
            f"{workdir} already holds a run (checkpoint at step {latest}): pass --resume to "
            f"continue it, or choose another --workdir"
        )
    if resume and latest is not None:
        saved = workdir / "config.json"
        if saved.exists() and _saved_config(saved) != json.loads(cfg.to_json()):
            raise TrainError(
                f"--resume: the config differs from the one the run in {workdir} was started "
                f"with ({saved}); resume with the same --config and --set values"
            )
    workdir.mkdir(parents=True, exist_ok=True)
    if main_host:  # atomically: the other processes of a resumed run read it (the check above)
        write_atomic(workdir / "config.json", cfg.to_json())

    graphdef, fresh = create_model(cfg, tc.seed)
    params = (
        initial_params(cfg, fresh, init_from, load_from, drop_head) if latest is None else fresh
    )
    if cfg.model.depth_prior and latest is None and load_from is None:
        params = with_depth_prior(cfg, params, depth_profile(cfg, data))
    tx, schedule = make_optimizer(cfg, total)
    replicated = sharding.replicated(mesh)
    state = jax.device_put(create_train_state(cfg, params, tx), replicated)
    loader = make_loader(
        cfg, data.root, data.train_ids, train=True, batch_size=tc.batch_size, seed=tc.seed
    )
    it = iter(loader)
    # stale: validations in a row above the best MAPE (train.early_stop_patience)
    best, start, stale = math.inf, 0, 0
    if resume and latest is not None:
        warn = (
            (lambda msg: print(msg, file=sys.stderr, flush=True))
            if main_host
            else (lambda msg: None)
        )
        start, state, loader_state, meta = ckpts.restore_newest_intact(state, log=warn)
        it.set_state(loader_state)
        best = meta["best_mape"]
        stale = meta.get("validations_since_best", 0)  # absent in checkpoints from before it
        if main_host:
            print(f"resuming {workdir} at step {start} of {total}", flush=True)
    log = RunLog(workdir, start if resume else None, enabled=main_host)

    state_shardings = jax.tree.map(lambda _: replicated, state)
    step_fn = jax.jit(
        make_train_step(cfg, graphdef, tx, schedule, ema_start),
        donate_argnums=0,
        out_shardings=(state_shardings, replicated),
    )
    eval_fn = jax.jit(
        make_eval_step(graphdef, tc.val_tta, cfg.geometry.flip_channels), out_shardings=replicated
    )

    def eval_params(step: int):
        return state["ema"] if step > ema_start else state["params"]

    def save(step: int, loader_state: dict) -> None:
        ckpts.save(
            step,
            state,
            loader_state,
            {
                "step": step,
                "epoch": step // steps_per_epoch,
                "best_mape": best,
                "validations_since_best": stale,
                "config": cfg.to_dict(),
            },
        )

    from tqdm import tqdm

    bar = tqdm(
        total=total,
        initial=start,
        desc=f"train {cfg.name}",
        unit="step",
        disable=not (progress and main_host),
        dynamic_ncols=True,
    )
    pending, t0, seen, val_mape, warned = [], time.perf_counter(), 0, None, False
    loader_state = it.get_state()
    step = start
    patience = tc.early_stop_patience
    stopped = 0 < patience <= stale  # a run that stopped early resumes as finished
    sigterm = _SigtermFlag()
    try:
        for step in range(start, start if stopped else total):
            host_batch = next(it)
            if on_batch is not None:
                on_batch(step, host_batch)
            batch = sharding.host_to_global(mesh, host_batch)
            del host_batch  # its arrays are recycled by the loader once unreferenced
            state, metrics = step_fn(state, batch)
            loader_state = it.get_state()
            pending.append(metrics)
            seen += tc.batch_size
            done = step + 1
            if done % tc.log_every_steps == 0 or done % steps_per_epoch == 0:
                m = jax.device_get(pending)
                rate = seen / (time.perf_counter() - t0)
                rec = {
                    "step": done,
                    "epoch": done / steps_per_epoch,
                    "train/loss": float(np.mean([p["loss"] for p in m])),
                    "train/grad_norm": float(np.mean([p["grad_norm"] for p in m])),
                    "lr": float(m[-1]["lr"]),
                    "loss_scale": float(m[-1]["loss_scale"]),
                    "skipped_steps": int(m[-1]["skipped_steps"]),
                    "samples_per_s": rate,
                }
                log.write(rec)
                if rec["train/grad_norm"] < VANISHED_GRAD_NORM and not warned and main_host:
                    warned = True
                    tqdm.write(
                        f"warning: step {done}: gradient norm {rec['train/grad_norm']:.1e}: the "
                        "gradients have "
                        "vanished (the output sigmoid has most likely saturated), so this run "
                        "will not "
                        f"improve; start again with a lower train.lr (now {tc.lr:g})",
                        file=sys.stderr,
                    )
                bar.set_postfix(
                    loss=f"{rec['train/loss']:.4f}",
                    lr=f"{rec['lr']:.2e}",
                    samples_s=f"{rate:.2f}",
                    **({"val_mape": f"{val_mape:.4f}"} if val_mape is not None else {}),
                )
                pending, t0, seen = [], time.perf_counter(), 0
            bar.update(1)
            epoch_end = done % steps_per_epoch == 0
            if (
                epoch_end
                and data.val_ids
                and ((done // steps_per_epoch) % tc.val_every_epochs == 0 or done == total)
            ):
                val_mape, truth0, pred0 = evaluate(
                    eval_fn, eval_params(done), cfg, data, mesh, tc.batch_size
                )
                log.image(done, truth0, pred0)
                log.write(
                    {
                        "step": done,
                        "epoch": done / steps_per_epoch,
                        "val/mape": val_mape,
                        "val/ema": done > ema_start,
                    }
                )
                # the first place's early stopping: a tie with the best counts as no worse
                stale = stale + 1 if val_mape > best else 0
                if val_mape < best:
                    best = val_mape
                    save_params(workdir / "best", eval_params(done), cfg)  # every host: collective
                stopped = 0 < patience <= stale
                t0 = time.perf_counter()
            if epoch_end or (tc.checkpoint_every_steps and done % tc.checkpoint_every_steps == 0):
                save(done, loader_state)
            if stopped:
                if main_host:
                    tqdm.write(
                        f"early stop after step {done} (epoch {done // steps_per_epoch}) of "
                        f"{total}: validation MAPE above the best ({best:.6f}) {stale} times in a "
                        f"row (train.early_stop_patience={patience})",
                        file=sys.stderr,
                    )
                break
            if done < total and (sigterm.raised or ckpts.reached_preemption(done)):
                raise Preempted(done, total, ckpts.path(done))
    except BaseException as e:
        # keep the work of every finished step (a failed batch read, Ctrl-C or SIGTERM loses
        # nothing), unless saving is what failed
        if not isinstance(e, CheckpointError):
            if int(state["step"]) > (ckpts.latest_step() or 0):
                save(int(state["step"]), loader_state)
            ckpts.wait()
        raise
    finally:
        sigterm.restore()
        bar.close()
        log.close()
    ckpts.wait()
    last = int(state["step"])  # total, or where early stopping ended the run
    final = eval_params(last)
    save_params(workdir / "final", final, cfg)  # every host: orbax's save is collective
    if not data.val_ids:  # nothing to choose by: the final weights are the best we have
        save_params(workdir / "best", final, cfg)
    ckpts.close()
    return {
        "steps": last,
        "early_stopped": stopped,
        "best_mape": best if data.val_ids else None,
        "final_mape": val_mape,
        "skipped_steps": int(state["loss_scale"].skipped),
        "traces": dict(TRACES),
        "workdir": str(workdir),
    }


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fwi_jax.train", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--config",
        required=True,
        help="config name in configs/ (tiny_s8, base_s6, base_s8, demo) or a path",
    )
    ap.add_argument(
        "--data",
        help="folder of competition-format sample folders, or a packed store "
        "(python -m fwi_jax.data pack) (default: data.root, or synthetic)",
    )
    ap.add_argument("--train-list", help="text file of training ids, one per line")
    ap.add_argument("--val-list", help="text file of validation ids")
    ap.add_argument("--workdir", help="run directory (default runs/<config>)")
    ap.add_argument("--seed", type=int, help="train.seed (initialisation, shuffle, flips)")
    add_override_argument(ap)
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --workdir from its newest checkpoint",
    )
    ap.add_argument(
        "--init-from",
        help="initial weights: timm EVA02 / reference PyTorch checkpoint, or a params checkpoint",
    )
    ap.add_argument("--load-from", help="initial weights from another run (its best/ params)")
    ap.add_argument("--drop-head", action="store_true", help="with --load-from: keep a fresh head")
    ap.add_argument(
        "--distributed",
        action="store_true",
        help="force jax.distributed.initialize() (it is "
        "called automatically when the environment describes a cluster)",
    )
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from fwi_jax.data.io import DataError

    args = build_parser().parse_args(argv)
    sharding.initialize_distributed(force=args.distributed)
    tune_cpu_host()  # first: jax.process_index() and friends start the backends
    overrides = list(args.set)
    for key, value in (
        ("data.root", args.data),
        ("data.train_list", args.train_list),
        ("data.val_list", args.val_list),
        ("train.seed", args.seed),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        if args.drop_head and not args.load_from:
            raise TrainError("--drop-head needs --load-from RUN")
        if args.init_from and args.load_from:
            raise TrainError("give --init-from or --load-from, not both")
        cfg = load_config(args.config, overrides)
        workdir = args.workdir or f"runs/{cfg.name}"
        summary = train(
            cfg,
            workdir,
            resume=args.resume,
            init_from=args.init_from,
            load_from=args.load_from,
            drop_head=args.drop_head,
            progress=not args.no_progress,
        )
    except (TrainError, ConfigError, DataError, CheckpointError, StorageError) as e:
        return sharding.fail(e)
    except Preempted as e:
        if jax.process_index() == 0:
            again = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
            print(
                f"{e}; to continue: python -m fwi_jax.train {shlex.join(again)} --resume",
                file=sys.stderr,
                flush=True,
            )
        return PREEMPTED_EXIT
    except Exception as e:  # a bug: in a multi-process run the others must not wait for this one
        traceback.print_exc()
        return sharding.fail(f"{type(e).__name__}: {e}", code=1)
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "traces"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
