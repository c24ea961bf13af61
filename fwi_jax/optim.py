"""Optimiser, learning-rate schedule, dynamic loss scaling and EMA (SPEC §5), all on plain pytrees.

- ``learning_rate_schedule``: multiplier 1.0 for ``constant_fraction`` of all steps, then cosine
  down to ``final_lr_factor`` (optax ``join_schedules`` of a constant and a cosine decay); an
  optional linear warmup from 0 over the first ``warmup_steps`` (0 in the reference recipe).
- ``make_optimizer``: optax AdamW (default; weight decay only on matrices, not on biases, norms,
  the cls token or position embeddings) or optax's Muon (2-D matrices; Adam on the rest, as the
  reference's MuonWithAuxAdam), optionally after global-norm clipping.
- ``LossScale``: dynamic loss scaling for float16 compute, as PyTorch's GradScaler does it.
- ``ema_update``: the reference's EMA (a copy of the weights taken at a given step, then
  ``ema = d * ema + (1 - d) * params`` after every optimiser step).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fwi_jax.config import Config, ConfigError, TrainConfig

OPTIMIZERS = ("adamw", "muon")
NO_DECAY_NAMES = ("pos_embed", "cls_token")


def learning_rate_schedule(tc: TrainConfig, total_steps: int) -> optax.Schedule:
    """Per-step learning rate: a linear ramp from 0 to ``lr`` over ``warmup_steps`` (none by
    default), ``lr`` until ``constant_fraction`` of ``total_steps``, then a cosine to
    ``lr * final_lr_factor`` at the last step."""
    constant_steps = int(total_steps * tc.constant_fraction)
    decay_steps = max(1, total_steps - constant_steps)
    if not 0 <= tc.warmup_steps <= constant_steps:
        raise ConfigError(
            f"train.warmup_steps={tc.warmup_steps} must lie in [0, {constant_steps}], the constant part of "
            f"{total_steps} steps (train.constant_fraction={tc.constant_fraction})")
    schedules = [optax.constant_schedule(tc.lr),
                 optax.cosine_decay_schedule(tc.lr, decay_steps, alpha=tc.final_lr_factor)]
    boundaries = [constant_steps]
    if tc.warmup_steps:
        schedules.insert(0, optax.linear_schedule(0.0, tc.lr, tc.warmup_steps))
        boundaries.insert(0, tc.warmup_steps)
    return optax.join_schedules(schedules, boundaries)


def decay_mask(params: Any) -> Any:
    """True for weight matrices (ndim >= 2) except the embeddings in ``NO_DECAY_NAMES``."""

    def decays(path, leaf) -> bool:
        names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
        return jnp.ndim(leaf) >= 2 and not any(str(n) in NO_DECAY_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: Config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, learning-rate schedule) for ``cfg.train``."""
    tc = cfg.train
    schedule = learning_rate_schedule(tc, total_steps)
    if tc.optimizer == "adamw":
        tx = optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask)
    elif tc.optimizer == "muon":
        tx = optax.contrib.muon(
            schedule, beta=tc.muon_momentum, weight_decay=tc.weight_decay, weight_decay_mask=decay_mask,
            adam_b1=tc.b1, adam_b2=tc.b2, adam_weight_decay=tc.weight_decay,
        )
    else:
        raise ValueError(f"unknown train.optimizer {tc.optimizer!r}; choose one of {OPTIMIZERS}")
    if tc.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(tc.clip_norm), tx)
    return tx, schedule


@struct.dataclass
class LossScale:
    """Dynamic loss scale (PyTorch GradScaler semantics: start 2**16, halve on a non-finite
    gradient and skip that step, double after ``GROWTH_INTERVAL`` finite steps in a row).

    Written here because optax has no loss scaling and jmp, which does, is unmaintained; the
    whole rule is ``adjust`` below. A static scale of 1 (``LossScale.none()``) is float32/bf16."""

    scale: jax.Array  # float32 scalar
    good_steps: jax.Array  # int32, finite steps since the last change
    skipped: jax.Array  # int32, steps skipped so far (logged)
    dynamic: bool = struct.field(pytree_node=False, default=False)

    GROWTH_INTERVAL = 2000
    INIT = 2.0**16

    @classmethod
    def create(cls, dynamic: bool) -> "LossScale":
        init = cls.INIT if dynamic else 1.0
        return cls(jnp.float32(init), jnp.int32(0), jnp.int32(0), dynamic)

    def adjust(self, finite: jax.Array) -> "LossScale":
        if not self.dynamic:
            return self.replace(skipped=self.skipped + jnp.where(finite, 0, 1).astype(jnp.int32))
        grow = finite & (self.good_steps + 1 >= self.GROWTH_INTERVAL)
        scale = jnp.where(finite, jnp.where(grow, self.scale * 2, self.scale), jnp.maximum(self.scale / 2, 1.0))
        good = jnp.where(finite & ~grow, self.good_steps + 1, 0).astype(jnp.int32)
        skipped = self.skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
        return self.replace(scale=scale.astype(jnp.float32), good_steps=good, skipped=skipped)


def uses_loss_scaling(cfg: Config) -> bool:
    """``train.loss_scale``: auto = dynamic for float16 compute, none otherwise."""
    mode = cfg.train.loss_scale
    if mode == "auto":
        return cfg.model.dtype == "float16"
    if mode in ("dynamic", "none"):
        return mode == "dynamic"
    raise ValueError(f"unknown train.loss_scale {mode!r}; choose auto, dynamic or none")


def all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def ema_update(ema: Any, params_before: Any, params_after: Any, step: jax.Array, start_step: int,
               decay: float) -> Any:
    """EMA after optimiser step ``step`` (0-based). At ``step == start_step`` the EMA is created as
    a copy of ``params_before`` (the weights at the start of that epoch); from then on
    ``ema = decay * ema + (1 - decay) * params_after``. Before ``start_step`` it is left as is."""
    started = step >= start_step
    first = step == start_step

    def one(e, p0, p1):
        e = jnp.where(first, p0, e)
        return jnp.where(started, decay * e + (1.0 - decay) * p1, e)

    return jax.tree.map(one, ema, params_before, params_after)
