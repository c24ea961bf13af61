"""Seismic preprocessing (reference §2). Functions here work on NumPy and JAX arrays alike.

Shapes: a raw sample is five shot gathers (5, 10001, 31) float32 in file order
`SOURCE_POSITIONS`; the model input ``x`` is (..., 6, n_time, n_receivers) in `CHANNEL_POSITIONS`
order with an all-zero channel for position 151; velocities ``v`` are (..., depth, x) in km/s.
"""

from __future__ import annotations

import numpy as np

SOURCE_POSITIONS = (1, 75, 150, 225, 300)  # file names receiver_data_src_{p}.npy
CHANNEL_POSITIONS = (1, 75, 150, 151, 225, 300)  # model channels; 151 is all zeros
ZERO_CHANNEL = CHANNEL_POSITIONS.index(151)  # 3 before a flip, 2 after
AMPLITUDE_SCALE = 1e4


def flip(x, v=None, channels: bool = True):
    """Mirror the survey left-right (reference §2.4): reverse channels and receivers of ``x``
    (..., 6, T, R) and the x axis of ``v`` (..., depth, x). Flip twice is the identity.
    ``channels=False`` reverses the receivers only (``geometry.flip_channels``; the first place's
    flip, which keeps the shot order)."""
    fx = x[..., ::-1, :, ::-1] if channels else x[..., ::-1]
    if v is None:
        return fx
    return fx, v[..., ::-1]


def shot_channels(x):
    """Model input (..., 6, T, R), in `CHANNEL_POSITIONS` order or flipped, -> the five shots
    (..., 5, T, R), by construction and whichever the orientation: the zero channel sits at
    `ZERO_CHANNEL` (3) before a flip and at 2 after one, so of channels 2 and 3 one is a shot and
    the other zeros, and their sum is the shot, exactly. Channels 0, 1, 4, 5 are shots either way.
    The order of the five differs between the orientations (the model's channel mean does not
    care). Values are never inspected: this relies on channel 151 being zeros, as
    `shots_to_input` makes it."""
    n = len(CHANNEL_POSITIONS)
    if x.shape[-3] != n:
        raise ValueError(f"model input {tuple(x.shape)}: expected {n} channels (..., {n}, T, R)")
    lo, hi = sorted((ZERO_CHANNEL, n - 1 - ZERO_CHANNEL))
    if lo == hi:  # the zero channel in the middle stays there under a flip
        return _cat(x, [x[..., :lo, :, :], x[..., lo + 1 :, :, :]])
    merged = x[..., lo : lo + 1, :, :] + x[..., hi : hi + 1, :, :]
    return _cat(x, [x[..., :lo, :, :], merged, x[..., lo + 1 : hi, :, :], x[..., hi + 1 :, :, :]])


def _cat(like, parts):
    if isinstance(like, np.ndarray):
        return np.concatenate(parts, axis=-3)
    import jax.numpy as jnp

    return jnp.concatenate(parts, axis=-3)


TIME_RESAMPLES = ("drop_last", "area")  # geometry.time_resample (config.CHOICES)


def _xp(like):
    if isinstance(like, np.ndarray):
        return np
    import jax.numpy as jnp

    return jnp


def area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The windows of PyTorch's ``F.interpolate(mode="area")`` along one axis, which is adaptive
    average pooling: output i averages inputs ``floor(i n_in / n_out)`` up to (excluding)
    ``ceil((i + 1) n_in / n_out)``. Returns (index (n_out, K) int64, valid (n_out, K) bool,
    count (n_out,) float32), K the widest window; invalid taps repeat the window's last index."""
    i = np.arange(n_out, dtype=np.int64)
    lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
    width = int((hi - lo).max())
    index = lo[:, None] + np.arange(width, dtype=np.int64)[None]
    valid = index < hi[:, None]
    return np.minimum(index, hi[:, None] - 1), valid, (hi - lo).astype(np.float32)


def area_resample(x, n_out: int, axis: int = -2):
    """PyTorch's ``F.interpolate(mode="area")`` of one axis of ``x`` (NumPy, or JAX under
    ``jax.jit``) to ``n_out``, as a sparse linear map: the window's taps gathered and summed in
    order, then divided by the window's size, as PyTorch's CPU kernel sums and divides, so a
    float32 NumPy result is PyTorch's bit for bit (jitted, XLA may divide by multiplying with the
    reciprocal: one rounding apart on windows wider than two). 10001 -> 10000 time samples is
    the mean of neighbouring samples, ``(x[i] + x[i + 1]) / 2`` (bit for bit either way): half a
    sample later than dropping the last one, and smoothed."""
    xp = _xp(x)
    axis = axis % x.ndim
    index, valid, count = area_taps(x.shape[axis], n_out)
    bcast = (slice(None),) + (None,) * (x.ndim - 1 - axis)
    total = None
    for k in range(index.shape[1]):
        tap = xp.take(x, xp.asarray(index[:, k]), axis=axis)
        if not valid[:, k].all():
            tap = xp.where(xp.asarray(valid[:, k])[bcast], tap, xp.zeros((), x.dtype))
        total = tap if total is None else total + tap
    return total / xp.asarray(count, dtype=x.dtype)[bcast]


def resample_time(shots, time_resample: str = "drop_last"):
    """Shots (..., T + 1, R) -> (..., T, R): ``drop_last`` drops the last time sample (reference §2
    step 1); ``area`` area-resamples T + 1 -> T (`area_resample`; the first place's input step,
    ``geometry.time_resample``)."""
    if time_resample == "drop_last":
        return shots[..., :-1, :]
    if time_resample == "area":
        return area_resample(shots, shots.shape[-2] - 1, axis=-2)
    raise ValueError(f"time_resample={time_resample!r}: choose one of {', '.join(TIME_RESAMPLES)}")


def shots_to_input(shots, time_resample: str = "drop_last"):
    """Five raw shots (..., 5, 10001, 31) in `SOURCE_POSITIONS` order -> model input
    (..., 6, 10000, 31): the time axis to 10000 samples (`resample_time`: drop the last one, or
    area-resample), scale by 1e4, insert the zero channel 151 (reference §2 steps 1-3). NumPy in,
    NumPy out (JAX arrays work too)."""
    xp = _xp(shots)
    x = resample_time(shots, time_resample) * xp.asarray(AMPLITUDE_SCALE, dtype=shots.dtype)
    zero = xp.zeros_like(x[..., :1, :, :])
    return xp.concatenate([x[..., :ZERO_CHANNEL, :, :], zero, x[..., ZERO_CHANNEL:, :, :]], axis=-3)


def fold(x, factor: int):
    """(..., T, R) -> (..., T/factor, R*factor): row r, column c holds receiver c // factor at
    time factor*r + c % factor (reference §2.5)."""
    *lead, t, r = x.shape
    x = x.reshape(*lead, t // factor, factor, r)
    x = x.swapaxes(-1, -2)
    return x.reshape(*lead, t // factor, r * factor)


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """1-D linear interpolation with half-pixel centres and no antialiasing, as PyTorch's
    ``F.interpolate(mode="bilinear", align_corners=False)``: output i = w0[i] in[i0[i]] +
    w1[i] in[i1[i]]. Returns (i0, i1, w0, w1): int64 indices and float32 weights, each (n_out,).

    Written by hand because jax.image.resize renormalises edge weights differently when it
    downsamples; the source index is computed in float32 as PyTorch's CPU kernel does (a fused
    multiply-add of the float32 scale), so the weights carry the same rounding (up to 3e-5 at
    source rows near 1000)."""
    f32 = np.float32
    scale = np.float64(f32(n_in) / f32(n_out))
    src = (scale * (np.arange(n_out) + 0.5) - 0.5).astype(f32)
    src = np.maximum(src, f32(0.0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0.astype(f32)
    return i0, i1, (f32(1.0) - w1).astype(f32), w1.astype(f32)


def resize_axis(x, n_out: int, axis: int):
    """Bilinear resize of one axis of a JAX array to ``n_out`` by gathering the two taps of
    `bilinear_taps`: 3 n_out multiply-adds per line, where a dense matrix costs 2 n_in n_out."""
    import jax.numpy as jnp

    axis = axis % x.ndim
    i0, i1, w0, w1 = bilinear_taps(x.shape[axis], n_out)
    bcast = (slice(None),) + (None,) * (x.ndim - 1 - axis)
    w0, w1 = jnp.asarray(w0)[bcast], jnp.asarray(w1)[bcast]
    return (
        jnp.take(x, jnp.asarray(i0), axis=axis) * w0 + jnp.take(x, jnp.asarray(i1), axis=axis) * w1
    )


def fold_and_resize(x, factor: int, size: tuple[int, int]):
    """Model input (..., T, R) float32 -> folded (T/factor, R*factor) -> bilinear (size) image
    (PyTorch's bilinear resize, two taps per axis: `resize_axis`). Jittable."""
    folded = fold(x, factor)
    return resize_axis(resize_axis(folded, size[0], -2), size[1], -1)


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of PyTorch's ``F.interpolate(mode="area")`` along one axis
    (adaptive average pooling: output i averages inputs floor(i n_in / n_out) up to
    ceil((i+1) n_in / n_out))."""
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m.astype(np.float32)
