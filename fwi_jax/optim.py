"""Optimiser, learning-rate schedule, dynamic loss scaling and EMA (reference §5), on pytrees.

- ``learning_rate_schedule``: ``train.schedule``. constant_then_cosine (the reference):
  multiplier 1.0 for ``constant_fraction`` of all steps, then cosine down to ``final_lr_factor``
  (optax ``join_schedules`` of a constant and a cosine decay), an optional linear warmup from 0
  over the first ``warmup_steps`` (0 in the reference recipe). periodic_cosine_then_constant (the
  first place): PyTorch's ``CosineAnnealingLR`` run past its ``T_max`` (so it rises again), then
  a constant, switched as ``SequentialLR`` switches.
- gradient clipping: optax ``clip_by_global_norm(train.clip_norm)`` before the optimiser.
- ``make_optimizer``: optax AdamW (default; weight decay only on matrices, not on biases, norms,
  the cls token or position embeddings) or ``reference_muon``, the reference's MuonWithAuxAdam
  (Muon on the weight matrices, plain Adam on the rest), optionally after global-norm clipping.
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

NO_DECAY_NAMES = ("pos_embed", "cls_token")


def learning_rate_schedule(tc: TrainConfig, total_steps: int) -> optax.Schedule:
    """Per-step learning rate of ``tc.schedule`` over ``total_steps`` (``tc.epochs`` epochs).

    constant_then_cosine: a linear ramp from 0 to ``lr`` over ``warmup_steps`` (none by default),
    ``lr`` until ``constant_fraction`` of ``total_steps``, then a cosine to
    ``lr * final_lr_factor`` at the last step.

    periodic_cosine_then_constant: `periodic_cosine` until epoch ``constant_from_epoch``, then
    ``lr * constant_factor``."""
    if tc.schedule == "periodic_cosine_then_constant":
        return periodic_cosine_then_constant(tc, total_steps)
    if tc.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps={tc.warmup_steps} must be >= 0")
    # a warmup longer than the constant part delays the cosine until the warmup ends; one longer
    # than the run (a short trial of a long config) leaves the lr rising to its end
    constant_steps = max(int(total_steps * tc.constant_fraction), tc.warmup_steps)
    decay_steps = max(1, total_steps - constant_steps)
    schedules = [
        optax.constant_schedule(tc.lr),
        optax.cosine_decay_schedule(tc.lr, decay_steps, alpha=tc.final_lr_factor),
    ]
    boundaries = [constant_steps]
    if tc.warmup_steps:
        schedules.insert(0, optax.linear_schedule(0.0, tc.lr, tc.warmup_steps))
        boundaries.insert(0, tc.warmup_steps)
    return optax.join_schedules(schedules, boundaries)


def periodic_cosine(lr: float, lr_min: float, half_period: int) -> optax.Schedule:
    """``lr_min + (lr - lr_min) (1 + cos(pi t / half_period)) / 2`` for every step t: PyTorch's
    ``CosineAnnealingLR(T_max=half_period, eta_min=lr_min)`` stepped past ``T_max``, which does not
    stop at ``lr_min`` but climbs back to ``lr`` at 2 T_max, and so on (its recursive form is this
    closed form up to float64 rounding).

    Written by hand: optax's cosine schedules end at their last step (``cosine_decay_schedule``
    stays at its floor) or restart from the top (``sgdr_schedule``); none continues the cosine."""

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        return lr_min + (lr - lr_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * t / half_period))

    return schedule


def periodic_cosine_then_constant(tc: TrainConfig, total_steps: int) -> optax.Schedule:
    """The first place's schedule, stepped once per optimiser step: `periodic_cosine` for the
    steps before epoch ``constant_from_epoch``, then ``lr * constant_factor`` (PyTorch's
    ``LambdaLR`` with a constant factor). ``SequentialLR`` with one milestone M gives the step
    that follows M scheduler steps (0-based step M) the second schedule's value at its step 0,
    and every earlier step the first's: optax's ``join_schedules`` at boundary M, exactly."""
    if tc.cosine_half_period_steps < 1 or tc.constant_from_epoch < 0:
        raise ConfigError(
            f"train.cosine_half_period_steps={tc.cosine_half_period_steps} must be >= 1 and "
            f"train.constant_from_epoch={tc.constant_from_epoch} >= 0"
        )
    steps_per_epoch = total_steps // max(tc.epochs, 1)
    return optax.join_schedules(
        [
            periodic_cosine(tc.lr, tc.lr_min, tc.cosine_half_period_steps),
            optax.constant_schedule(tc.lr * tc.constant_factor),
        ],
        [tc.constant_from_epoch * steps_per_epoch],
    )


def decay_mask(params: Any) -> Any:
    """True for weight matrices (ndim >= 2) except the embeddings in ``NO_DECAY_NAMES``."""

    def decays(path, leaf) -> bool:
        names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
        return jnp.ndim(leaf) >= 2 and not any(str(n) in NO_DECAY_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


# The reference's Muon (MuonWithAuxAdam: 2-D weights to Muon, everything else to Adam)
MUON_NS_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz step X <- a X + (b A + c A^2) X
NS_STEPS = 5
NS_EPS = 1e-7  # the Newton-Schulz input is divided by (its Frobenius norm + this)
MUON_RMS = 0.2  # orthogonalised update x 0.2 sqrt(max(rows, cols)): Adam's update RMS (Moonlight)
ADAM_EPS = 1e-8
# 2-D leaves that go to Adam all the same: the patch embedding is a 4-D convolution weight in the
# reference, and its rule gives 4-D weights to Adam; ours is the same weight as a 2-D kernel
ADAM_MATRICES = ("patch_embed",)


def muon_labels(params: Any) -> Any:
    """ "muon" for every 2-D weight matrix (attention, MLP, head) outside ``ADAM_MATRICES``;
    "adam" for the rest (biases, norms, cls token, position embedding, patch embedding)."""

    def label(path, leaf) -> str:
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        return "muon" if jnp.ndim(leaf) == 2 and not set(names) & set(ADAM_MATRICES) else "adam"

    return jax.tree_util.tree_map_with_path(label, params)


def newton_schulz(g: jax.Array, dtype: Any = jnp.bfloat16) -> jax.Array:
    """(rows, cols) -> (rows, cols) in ``dtype``: approximately U V^T of g = U S V^T. g is divided
    by (its Frobenius norm + ``NS_EPS``), then takes ``NS_STEPS`` steps X <- a X + (b A + c A^2) X,
    A = X X^T, in its wide orientation (transposed while rows > cols).

    Written here rather than taken from optax's Muon, which rounds the coefficients to the
    working dtype: in bfloat16 a = 3.4445 becomes 3.4375, another polynomial with other singular
    values. Here, as in PyTorch, each scalar product is formed in float32 and rounded to
    ``dtype``, and matrix products accumulate in float32 and are rounded to ``dtype``."""
    f32 = jnp.float32
    a, b, c = NS_COEFFS

    def rounded(v):
        return v.astype(dtype)

    def dot(u, v):
        return rounded(jnp.dot(u, v, preferred_element_type=f32))

    def axpy(s, u, v):  # s u + v
        return rounded(s * u.astype(f32) + v.astype(f32))

    x = rounded(g)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    norm = rounded(jnp.linalg.norm(x.astype(f32)))
    x = rounded(x.astype(f32) / (norm.astype(f32) + NS_EPS))
    for _ in range(NS_STEPS):
        gram = dot(x, x.T)
        poly = axpy(b, gram, rounded(c * dot(gram, gram).astype(f32)))
        x = axpy(a, x, dot(poly, x))
    return x.T if tall else x


def orthogonalize(dtype: Any) -> optax.GradientTransformation:
    """Each (rows, cols) update u -> newton_schulz(u) x 0.2 sqrt(max(rows, cols)) (rounded to
    ``dtype``, as the reference scales its bfloat16 update), returned in u's dtype. The scale is
    optax Muon's ``consistent_rms=0.2``, which comes only with optax's Newton-Schulz steps."""

    def one(u):
        scale = MUON_RMS * max(u.shape) ** 0.5
        return (scale * newton_schulz(u, dtype).astype(jnp.float32)).astype(dtype).astype(u.dtype)

    return optax.stateless(lambda updates, _: jax.tree.map(one, updates))


def reference_muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float,
    b1: float,
    b2: float,
    weight_decay: float,
    ns_dtype: str = "bfloat16",
) -> optax.GradientTransformation:
    """The reference's MuonWithAuxAdam, with one learning rate and decoupled weight decay on every
    parameter (``p <- p (1 - lr wd) - lr u``).

    Muon (``muon_labels``): ``buf <- momentum buf + (1 - momentum) g``; Nesterov input
    ``(1 - momentum) g + momentum buf``, no bias correction; ``newton_schulz`` in ``ns_dtype``
    (bfloat16 as the reference; float32 optional); times 0.2 sqrt(max(rows, cols)).
    Adam (the rest): plain Adam with bias correction, eps 1e-8.

    Built from optax's ``partition``, ``trace``, ``adamw``, ``add_decayed_weights`` and
    ``scale_by_learning_rate``, not from ``optax.contrib.muon``: besides its Newton-Schulz
    coefficients (see ``newton_schulz``), it bias-corrects the momentum and the gradient by
    different factors (so the direction of the early updates differs), and its Adam half takes
    Muon's Nesterov flag and eps, while the reference's Adam is plain with an eps of its own."""
    if ns_dtype not in MUON_NS_DTYPES:
        raise ConfigError(
            f"unknown train.muon_ns_dtype {ns_dtype!r}; choose one of {tuple(MUON_NS_DTYPES)}"
        )
    muon = optax.chain(
        # trace: t <- g + m t, out g + m t: the Nesterov input above divided by (1 - m)
        optax.trace(decay=momentum, nesterov=True),
        optax.scale(1.0 - momentum),
        orthogonalize(MUON_NS_DTYPES[ns_dtype]),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    adam = optax.adamw(
        learning_rate, b1=b1, b2=b2, eps=ADAM_EPS, weight_decay=weight_decay, nesterov=False
    )
    return optax.partition({"muon": muon, "adam": adam}, muon_labels)


def make_optimizer(
    cfg: Config, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, learning-rate schedule) for ``cfg.train``."""
    tc = cfg.train
    schedule = learning_rate_schedule(tc, total_steps)
    if tc.optimizer == "adamw":
        tx = optax.adamw(
            schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask
        )
    else:  # muon (train.optimizer is validated when the config is loaded)
        tx = reference_muon(
            schedule,
            momentum=tc.muon_momentum,
            b1=tc.b1,
            b2=tc.b2,
            weight_decay=tc.weight_decay,
            ns_dtype=tc.muon_ns_dtype,
        )
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
    def create(cls, dynamic: bool) -> LossScale:
        init = cls.INIT if dynamic else 1.0
        return cls(jnp.float32(init), jnp.int32(0), jnp.int32(0), dynamic)

    def adjust(self, finite: jax.Array) -> LossScale:
        if not self.dynamic:
            return self.replace(skipped=self.skipped + jnp.where(finite, 0, 1).astype(jnp.int32))
        grow = finite & (self.good_steps + 1 >= self.GROWTH_INTERVAL)
        scale = jnp.where(
            finite, jnp.where(grow, self.scale * 2, self.scale), jnp.maximum(self.scale / 2, 1.0)
        )
        good = jnp.where(finite & ~grow, self.good_steps + 1, 0).astype(jnp.int32)
        skipped = self.skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
        return self.replace(scale=scale.astype(jnp.float32), good_steps=good, skipped=skipped)


def uses_loss_scaling(cfg: Config) -> bool:
    """``train.loss_scale``: auto = dynamic for float16 compute, none otherwise."""
    mode = cfg.train.loss_scale
    if mode == "auto":
        return cfg.model.dtype == "float16"
    return mode == "dynamic"


def all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def ema_update(
    ema: Any, params_before: Any, params_after: Any, step: jax.Array, start_step: int, decay: float
) -> Any:
    """EMA after optimiser step ``step`` (0-based). At ``step == start_step`` the EMA is created as
    a copy of ``params_before`` (the weights at the start of that epoch); from then on
    ``ema = decay * ema + (1 - decay) * params_after``. Before ``start_step`` it is left as is."""
    started = step >= start_step
    first = step == start_step

    def one(e, p0, p1):
        e = jnp.where(first, p0, e)
        return jnp.where(started, decay * e + (1.0 - decay) * p1, e)

    return jax.tree.map(one, ema, params_before, params_after)
