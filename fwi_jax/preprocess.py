"""Seismic preprocessing (SPEC §2). Functions here work on NumPy and JAX arrays alike.

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


def flip(x, v=None):
    """Mirror the survey left-right (SPEC §2.4): reverse channels and receivers of ``x``
    (..., 6, T, R) and the x axis of ``v`` (..., depth, x). Flip twice is the identity."""
    fx = x[..., ::-1, :, ::-1]
    if v is None:
        return fx
    return fx, v[..., ::-1]
