"""Preprocessing (reference §2) against the PyTorch ops the reference used."""

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fwi_jax.preprocess import (
    CHANNEL_POSITIONS,
    ZERO_CHANNEL,
    flip,
    fold,
    fold_and_resize,
    shot_channels,
    shots_to_input,
)


def shots(seed=0, t=10001):
    return np.random.default_rng(seed).standard_normal((2, 5, t, 31)).astype(np.float32) * 1e-5


def test_shots_to_input_drops_last_sample_scales_and_inserts_zero_channel():
    raw = shots()
    x = shots_to_input(raw)
    assert x.shape == (2, 6, 10000, 31) and x.dtype == np.float32
    assert CHANNEL_POSITIONS[ZERO_CHANNEL] == 151
    assert not x[:, ZERO_CHANNEL].any()
    others = [i for i in range(6) if i != ZERO_CHANNEL]
    np.testing.assert_allclose(x[:, others], raw[:, :, :-1] * np.float32(1e4), rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(jax.jit(shots_to_input)(raw)), x)


def test_flip_twice_is_identity_and_moves_zero_channel():
    x = shots_to_input(shots(1))
    v = np.random.default_rng(2).uniform(1.5, 4.5, (2, 1259, 300)).astype(np.float32)
    fx, fv = flip(x, v)
    # after a flip, channel k still holds the source at CHANNEL_POSITIONS[k] of the mirrored survey:
    # the zero channel (151) becomes index 2 (position 150 mirrored is 151)
    assert not fx[:, 2].any() and fx[:, ZERO_CHANNEL].any()
    np.testing.assert_array_equal(fx[:, 0], x[:, 5, :, ::-1])
    np.testing.assert_array_equal(fv, v[..., ::-1])
    xx, vv = flip(fx, fv)
    np.testing.assert_array_equal(xx, x)
    np.testing.assert_array_equal(vv, v)


def test_shot_channels_are_the_five_shots_either_way():
    """The five shots, exactly, before and after a flip (the zero channel moves from 3 to 2),
    NumPy and jitted JAX alike; a batch may mix the two orientations."""
    raw = shots(3)
    x = shots_to_input(raw)
    shots_in_order = x[:, [i for i in range(6) if i != ZERO_CHANNEL]]
    np.testing.assert_array_equal(shot_channels(x), shots_in_order)
    fx = flip(x)
    expected = flip(shots_in_order)  # the five mirrored shots in mirrored order
    np.testing.assert_array_equal(shot_channels(fx), expected)
    mixed = np.stack([x[0], fx[1]])
    got = np.asarray(jax.jit(shot_channels)(mixed))
    np.testing.assert_array_equal(got, np.stack([shots_in_order[0], expected[1]]))
    with pytest.raises(ValueError, match="expected 6 channels"):
        shot_channels(raw)


def torch_fold_resize(x, factor, size):
    b, c, t, r = x.shape
    x = (
        x.reshape(b, c, t // factor, factor, r)
        .permute(0, 1, 2, 4, 3)
        .reshape(b, c, t // factor, r * factor)
    )
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def test_fold_layout():
    x = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)  # value = 3*time + receiver
    f = fold(x, 10)
    assert f.shape == (2, 30)
    r, c = 1, 14  # receiver c // 10 = 1 at time 10*r + c % 10 = 14
    assert f[r, c] == 3 * 14 + 1


@pytest.mark.parametrize("size", [(1260, 308), (420, 84), (56, 42)])
def test_fold_and_resize_matches_torch(size):
    """Resize as two taps per axis vs F.interpolate: max |Δ| ≤ 1e-5 on unit-scale data (each
    output is a convex combination of 4 inputs; float32 rounding is ~1e-7)."""
    x = shots_to_input(shots(3))
    expected = torch_fold_resize(torch.from_numpy(x), 10, size).numpy()
    got = np.asarray(jax.jit(lambda a: fold_and_resize(a, 10, size))(x))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
