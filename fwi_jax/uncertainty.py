"""Where to trust a prediction: a label-free confidence map per pixel and a score per sample
(``python -m fwi_jax.infer --uncertainty``; docs/uncertainty.md).

Two ingredients, both computed in the ensemble's jitted program (`fwi_jax.ensemble`):

- the spread: the weighted standard deviation of the velocity over every member and every TTA
  view, divided by the ensemble's mean. A member of weight w contributes each of its V views with
  weight w / V, as in the ensemble's mean, so
  ``spread = sqrt(sum_mv (w_m / V) (p_mv - mean)^2 / sum_m w_m) / mean``;
- the scale (members with ``model.error_head``): b = exp(s) of the error head's Laplace log-scale
  s, the network's own estimate of the expected relative error |pred - v| / v at that pixel,
  averaged over the members that have it and their views with the same weights.

The map is b combined with the spread as independent errors, sqrt(b^2 + spread^2), where the
members have error heads, else the spread alone; a sample's score is the mean of its map. Both
estimate a relative error (0.05: about 5 %). With labels (``--val``), `rank_stats` reports how
well they rank the real errors: Spearman's correlation of score and MAPE over samples, and the
mean relative error of each decile of the map's pixels, pooled over samples.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fwi_jax.storage import write_atomic

MAP_SUFFIX = "_uncertainty.npz"  # beside the submission: OUT without .npz + this
STATS_SUFFIX = "_uncertainty.json"
DECILES = 10


def map_path(out: pathlib.Path) -> pathlib.Path:
    """The confidence maps' file beside the submission ``out`` (sub.npz -> sub_uncertainty.npz)."""
    return out.with_name(out.stem + MAP_SUFFIX)


def stats_path(out: pathlib.Path) -> pathlib.Path:
    return out.with_name(out.stem + STATS_SUFFIX)


# ---------------------------------------------------------------------------------------------
# In the jitted program


def weighted_spread(
    views: Sequence[jax.Array], weights: Sequence[jax.Array], mean: jax.Array
) -> jax.Array:
    """Relative spread (B, depth, x) of every member's every view around ``mean`` (B, depth, x).
    ``views``: per group (M, V, B, depth, x), the views unflipped; ``weights``: per group (M,).
    Each view of a member of weight w weighs w / V; centred on ``mean`` (two passes, float32)."""
    total, norm = 0.0, 0.0
    for p, w in zip(views, weights):
        d = p - mean[None, None]
        ss = jnp.einsum("mvbhw,mvbhw->mbhw", d, d, precision=jax.lax.Precision.HIGHEST)
        total = total + jnp.einsum(
            "m,mbhw->bhw", w / p.shape[1], ss, precision=jax.lax.Precision.HIGHEST
        )
        norm = norm + w.sum()
    return jnp.sqrt(total / norm) / mean


def weighted_scale(
    log_scales: Sequence[jax.Array | None], weights: Sequence[jax.Array]
) -> jax.Array | None:
    """b (B, depth, x): exp of the error heads' log-scales, per group (M, V, B, depth, x) or None
    (a group without ``model.error_head``), averaged with the weights of the members that have
    one, each view w / V. None when no group has an error head."""
    total, norm = 0.0, 0.0
    for s, w in zip(log_scales, weights):
        if s is None:
            continue
        b = jnp.exp(s).sum(axis=1) / s.shape[1]  # (M, B, depth, x), the views' mean
        total = total + jnp.einsum("m,mbhw->bhw", w, b, precision=jax.lax.Precision.HIGHEST)
        norm = norm + w.sum()
    return None if isinstance(total, float) else total / norm


def combine(spread: jax.Array | None, scale: jax.Array | None) -> jax.Array:
    """The confidence map: sqrt(scale^2 + spread^2), or whichever of the two there is."""
    if scale is None:
        return spread
    if spread is None:
        return scale
    return jnp.sqrt(scale * scale + spread * spread)


def what_is_measured(n_views_total: int, has_scale: bool) -> str:
    """One line naming the map's ingredients; ``n_views_total``: members x TTA views."""
    parts = []
    if has_scale:
        parts.append("the error heads' scale b")
    if n_views_total > 1:
        parts.append(f"the spread over {n_views_total} members x views")
    return " combined with ".join(parts)


# ---------------------------------------------------------------------------------------------
# On the host: scores, statistics, files


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def to_float16(conf_map: np.ndarray) -> tuple[np.ndarray, int]:
    """The map as stored: float16, values above float16's largest (an error head far outside its
    training data: a scale of more than 65504) clipped to it; and how many were clipped."""
    a = np.asarray(conf_map, np.float32)
    over = int(np.count_nonzero(a > FLOAT16_MAX))
    return np.minimum(a, FLOAT16_MAX).astype(np.float16), over


def sample_score(conf_map: np.ndarray) -> float:
    """A sample's score: the mean of its map (float64)."""
    return float(np.mean(conf_map, dtype=np.float64))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank); NaN with fewer than 2 values or a
    constant input."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or a.size != b.size:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def _ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="stable")
    ranks = np.empty(a.size, np.float64)
    ranks[order] = np.arange(a.size, dtype=np.float64)
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def decile_errors(
    maps: Sequence[np.ndarray], errors: Sequence[np.ndarray]
) -> tuple[np.ndarray, float]:
    """((10,) mean relative error of the pixels in each decile of the map, lowest map values
    first; the mean relative error of all pixels), pixels of every sample pooled; ties are split
    by position."""
    m = np.concatenate([np.ravel(a) for a in maps]).astype(np.float32)
    e = np.concatenate([np.ravel(a) for a in errors]).astype(np.float64)
    if m.size != e.size or m.size < DECILES:
        raise ValueError(f"decile_errors: {m.size} map pixels for {e.size} errors")
    order = np.argsort(m, kind="stable")
    return np.array([part.mean() for part in np.array_split(e[order], DECILES)]), float(e.mean())


def rank_stats(
    scores: Mapping[str, float],
    mape: Mapping[str, float],
    maps: Mapping[str, np.ndarray],
    errors: Mapping[str, np.ndarray],
) -> dict:
    """How well the confidence ranks the real errors: Spearman(score, MAPE) over samples; the
    mean relative error per decile of the map and the top decile's ratio to the mean of all
    pixels."""
    ids = list(scores)
    dec, mean = decile_errors([maps[i] for i in ids], [errors[i] for i in ids])
    rho = spearman([scores[i] for i in ids], [mape[i] for i in ids])
    return {
        "samples": len(ids),
        # None (JSON null) where undefined: fewer than 2 samples, or a constant score or MAPE
        "spearman_score_mape": rho if np.isfinite(rho) else None,
        "decile_mean_relative_error": [float(x) for x in dec],
        "mean_relative_error": mean,
        "top_decile_ratio": float(dec[-1] / mean),
    }


def write_maps(path: pathlib.Path, maps: Mapping[str, np.ndarray]) -> None:
    """One .npz beside the submission: key = sample id, float16 (x, depth) like the submission's
    arrays; written atomically."""
    arrays = {str(k): np.asarray(v, np.float16) for k, v in maps.items()}
    write_atomic(path, lambda f: np.savez(f, **arrays))
