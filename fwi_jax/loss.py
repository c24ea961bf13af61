"""Losses and the competition metric (reference §4). Velocities are (B, depth, x) in km/s.

e = |pred - v| / v                       relative error per pixel
w(z) = linspace(1.0, 0.25, depth)        depth weight (shallow pixels count 4x the deepest)
base:  L = mean(e * w)
hard:  h = exp(stop_gradient(e)), renormalised per sample to mean 1;  L = mean(e * w * h)
mape:  L = mean(|pred - v| / (|v| + 1e-8))  every depth alike (the score itself; the first
                                          place's training loss, their formula to the letter)
nll:   mean(sg(e) / b + log b), b = exp(s) per pixel: the Laplace negative log-likelihood of
       the relative error under the error head's log-scale s (``model.error_head``), the error
       itself held fixed (sg: no gradient), so b learns E[e] and the velocity is untouched
MAPE:  mean(e) per sample (the competition score is its mean over samples);
       `competition_mape` is the score of one sample as the competition computes it
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def relative_error(pred: jax.Array, v: jax.Array) -> jax.Array:
    """|pred - v| / v, float32, same shape as v."""
    pred, v = pred.astype(jnp.float32), v.astype(jnp.float32)
    return jnp.abs(pred - v) / v


def depth_weight(depth: int) -> jax.Array:
    """(depth, 1) weights from 1.0 at the surface to 0.25 at the bottom."""
    return jnp.linspace(1.0, 0.25, depth, dtype=jnp.float32)[:, None]


def base_loss(pred: jax.Array, v: jax.Array) -> jax.Array:
    """Depth-weighted relative L1, a scalar."""
    return jnp.mean(relative_error(pred, v) * depth_weight(v.shape[-2]))


def hard_mining_loss(pred: jax.Array, v: jax.Array) -> jax.Array:
    """Depth-weighted relative L1 with pixels reweighted by exp(error) (no gradient through the
    weights), normalised so each sample's weights average to 1."""
    e = relative_error(pred, v)
    h = jnp.exp(jax.lax.stop_gradient(e))
    h = h * (h.shape[-2] * h.shape[-1]) / jnp.sum(h, axis=(-2, -1), keepdims=True)
    return jnp.mean(e * depth_weight(v.shape[-2]) * h)


MAPE_EPS = 1e-8  # the competition's and the first place's epsilon


def mape_loss(pred: jax.Array, v: jax.Array) -> jax.Array:
    """Relative L1 with every pixel alike, a scalar: the competition's MAPE and the first place's
    training loss, mean(|v - pred| / (|v| + 1e-8)) as they wrote it. In float32 the epsilon
    vanishes for any velocity above 0.17 km/s (it is below half a unit in the last place), so
    this equals mean(`relative_error`) there."""
    pred, v = pred.astype(jnp.float32), v.astype(jnp.float32)
    return jnp.mean(jnp.abs(v - pred) / (jnp.abs(v) + MAPE_EPS))


def laplace_nll(log_scale: jax.Array, pred: jax.Array, v: jax.Array) -> jax.Array:
    """The Laplace negative log-likelihood (up to log 2) of the relative error of ``pred``
    under the per-pixel scale exp(``log_scale``), a scalar; no gradient reaches ``pred``."""
    e = jax.lax.stop_gradient(relative_error(pred, v))
    s = log_scale.astype(jnp.float32)
    return jnp.mean(e * jnp.exp(-s) + s)


LOSSES = {
    "base": base_loss,
    "hard": hard_mining_loss,
    "mape": mape_loss,
}  # train.loss (config.CHOICES)


def get_loss(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``train.loss`` (validated when the config is loaded) -> loss function."""
    return LOSSES[name]


def mape_per_sample(pred: jax.Array, v: jax.Array) -> jax.Array:
    """(B,) mean absolute percentage error of each sample (as a fraction, not %)."""
    return jnp.mean(relative_error(pred, v), axis=(-2, -1))


def competition_mape(v_true: np.ndarray, v_pred: np.ndarray) -> float:
    """The competition's score of one sample (reference §1): mean over pixels of
    |v_true - v_pred| / (v_true + 1e-8), in float64 on the host."""
    v_true = np.asarray(v_true, np.float64)
    return float(np.mean(np.abs(v_true - np.asarray(v_pred, np.float64)) / (v_true + 1e-8)))
