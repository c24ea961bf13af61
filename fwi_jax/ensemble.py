"""The ensemble as one jitted program: members grouped by network, their params stacked, and a
weighted mean of their predictions with flip test-time augmentation, sharded over devices.

Members whose configs build the same network (geometry + model, `members.network_key`) are
stacked (``jax.tree.map(np.stack)``) and evaluated with ``vmap`` (or ``lax.map`` in chunks); the
groups, flip TTA (``½(f(x) + unflip f(flip x))``) and the weighted mean live in ONE jitted
function, so a batch crosses the host-device boundary once each way. With
``model.constant_channel_once`` each member's zero-channel tokens (`model.constant_tokens`) are
computed once and reused for every sample and both TTA passes; `Predictor` computes them once
for all batches. `Predictor` runs it on a
1-D ``data`` mesh: batches sharded over every device, params replicated. Training's validation
runs a single member through `member_predictions`. With ``uncertainty`` the same program also
keeps every member's every view (`member_views`) and returns the confidence map beside the mean
(`fwi_jax.uncertainty`); without it the program is the one it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fwi_jax import sharding
from fwi_jax import uncertainty as uncertainty_lib
from fwi_jax.config import Config
from fwi_jax.members import Member, MemberError, network_key
from fwi_jax.model import abstract_model, apply_model, constant_tokens
from fwi_jax.preprocess import flip


@dataclasses.dataclass
class Group:
    """Members of one network: params stacked on a new leading axis (M, ...), weights (M,)."""

    cfg: Config
    graphdef: Any
    params: Any
    weights: np.ndarray
    sources: list[str]


def stack_params(params: Sequence[Any]) -> Any:
    """[tree, tree, ...] -> tree of arrays with a leading member axis."""
    return jax.tree.map(
        lambda *leaves: np.stack([np.asarray(a, np.float32) for a in leaves]), *params
    )


def group_members(members: Sequence[Member]) -> list[Group]:
    """Group members by network (first-seen order) and stack each group's params."""
    if not members:
        raise MemberError("no ensemble members given (--checkpoints or --ensemble)")
    out_shapes = {m.cfg.geometry.out_shape for m in members}
    in_shapes = {(m.cfg.geometry.n_time, m.cfg.geometry.n_receivers) for m in members}
    if len(out_shapes) > 1 or len(in_shapes) > 1:
        raise MemberError(
            "ensemble members disagree on input or output grids: "
            + ", ".join(
                f"{m.source}: in {m.cfg.geometry.n_time}x{m.cfg.geometry.n_receivers} "
                f"out {m.cfg.geometry.out_shape}"
                for m in members
            )
        )
    resamples = {m.cfg.geometry.time_resample for m in members}
    if len(resamples) > 1:  # one input is read for every member
        raise MemberError(
            "ensemble members read their input differently (geometry.time_resample): "
            + ", ".join(f"{m.source}: {m.cfg.geometry.time_resample}" for m in members)
            + "; run them as separate inferences, or set one value for all"
        )
    by_key: dict[str, list[Member]] = {}
    for m in members:
        by_key.setdefault(network_key(m.cfg), []).append(m)
    groups = []
    for ms in by_key.values():
        structures = {jax.tree.structure(m.params) for m in ms}
        if len(structures) > 1:
            raise MemberError(
                f"members {[m.source for m in ms]} share a config but not a parameter tree"
            )
        graphdef = graphdef_of(ms[0].cfg)
        groups.append(
            Group(
                cfg=ms[0].cfg,
                graphdef=graphdef,
                params=stack_params([m.params for m in ms]),
                weights=np.array([m.weight for m in ms], np.float32),
                sources=[m.source for m in ms],
            )
        )
    return groups


_GRAPHDEFS: dict[str, Any] = {}


def graphdef_of(cfg: Config) -> Any:
    """The NNX graphdef of ``cfg``'s network, traced abstractly (no params allocated), cached."""
    key = network_key(cfg)
    if key not in _GRAPHDEFS:
        _GRAPHDEFS[key] = abstract_model(cfg)[0]
    return _GRAPHDEFS[key]


def member_constants(graphdef: Any, stacked: Any) -> Any:
    """Stacked params (M, ...) -> each member's zero-channel tokens (M, 1, 1 + N, dim), or None
    when the network's ``model.constant_channel_once`` is off."""
    return jax.vmap(lambda p: constant_tokens(graphdef, p))(stacked)


def _member_outputs(
    graphdef: Any,
    stacked: Any,
    x: jax.Array,
    tta: bool,
    member_chunk: int | None,
    tta_in_batch: bool,
    constants: Any,
    flip_channels: bool,
    log_scale: bool,
) -> Any:
    """Every member's raw output on x (and, with ``tta``, on the flipped x): (M, 2B or B, depth,
    x) velocities, with ``log_scale`` a pair (velocities, the error head's log-scales); the
    flipped rows come after the others and are not yet unflipped."""
    b = x.shape[0]

    def member_constant(p, k):
        return constant_tokens(graphdef, p) if k is None else k

    if tta and not tta_in_batch:
        pair = jnp.stack([x, flip(x, channels=flip_channels)])  # (2, B, ...): x, then flipped

        def run(p, k):
            k = member_constant(p, k)
            out = jax.lax.map(lambda xi: apply_model(graphdef, p, xi, k, log_scale), pair)
            # as the in-batch layout: x rows, then flipped
            return jax.tree.map(lambda a: a.reshape(2 * b, *a.shape[2:]), out)
    else:
        x_in = jnp.concatenate([x, flip(x, channels=flip_channels)], axis=0) if tta else x
        run = lambda p, k: apply_model(graphdef, p, x_in, member_constant(p, k), log_scale)
    m = jax.tree.leaves(stacked)[0].shape[0]
    if member_chunk is None or member_chunk >= m:
        return jax.vmap(run)(stacked, constants)
    return jax.lax.map(lambda pk: run(*pk), (stacked, constants), batch_size=member_chunk)


def member_predictions(
    graphdef: Any,
    stacked: Any,
    x: jax.Array,
    tta: bool,
    member_chunk: int | None = None,
    tta_in_batch: bool = True,
    constants: Any = None,
    flip_channels: bool = True,
) -> jax.Array:
    """Every member's prediction: stacked params (M, ...) and x (B, 6, T, R) -> (M, B, depth, x).
    x float32, or float16 (the model casts it to float32, exactly). With ``tta``: ½(f(x) + unflip
    f(flip x)), the flipped copy riding in the same batch (``tta_in_batch``: one forward pass of
    2B), or else in a second pass of B after the first (``lax.map``: on CPU a batch of B is faster
    per sample). Members are vmapped; ``member_chunk`` bounds how many run at once (``lax.map`` in
    chunks). ``constants``: `member_constants` of ``stacked`` when the caller keeps them across
    calls; None: each member computes its own once here, for every sample and both TTA passes.
    ``flip_channels``: the config's flip (``geometry.flip_channels``, `preprocess.flip`)."""
    b = x.shape[0]
    pred = _member_outputs(
        graphdef, stacked, x, tta, member_chunk, tta_in_batch, constants, flip_channels, False
    )
    if tta:
        # [..., ::-1] = preprocess.flip's velocity mirror
        pred = 0.5 * (pred[:, :b] + pred[:, b:][..., ::-1])
    return pred


def member_views(
    graphdef: Any,
    stacked: Any,
    x: jax.Array,
    tta: bool,
    member_chunk: int | None = None,
    tta_in_batch: bool = True,
    constants: Any = None,
    flip_channels: bool = True,
    log_scale: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Every member's every TTA view, unflipped: (M, V, B, depth, x) velocities (V = 2 with
    ``tta``, else 1) and, with ``log_scale`` (``model.error_head``), the error head's log-scales
    in the same layout (else None). Arguments as `member_predictions`, whose result is the views'
    mean."""
    b = x.shape[0]
    out = _member_outputs(
        graphdef, stacked, x, tta, member_chunk, tta_in_batch, constants, flip_channels, log_scale
    )
    if tta:
        out = jax.tree.map(lambda a: jnp.stack([a[:, :b], a[:, b:][..., ::-1]], axis=1), out)
    else:
        out = jax.tree.map(lambda a: a[:, None], out)
    return out if log_scale else (out, None)


def ensemble_fn(
    groups: Sequence[Group],
    tta: bool = True,
    member_chunk: int | None = None,
    tta_in_batch: bool = True,
    uncertainty: bool = False,
) -> Callable:
    """A pure function (params tuple, weights tuple, x[, constants tuple]) -> weighted ensemble
    mean (B, depth, x). Jit it once: all groups, TTA and the mean are one program. ``constants``:
    each group's `member_constants`, kept across calls (None: computed in the call). With
    ``uncertainty``: (mean, the confidence map (B, depth, x)) instead (`fwi_jax.uncertainty`:
    the spread over every member's every view, the members' error heads), the mean as without."""
    graphdefs = [g.graphdef for g in groups]
    flips = [g.cfg.geometry.flip_channels for g in groups]  # each config's own flip TTA
    heads = [g.cfg.model.error_head for g in groups]

    def f(params: tuple, weights: tuple, x: jax.Array, constants: tuple | None = None) -> jax.Array:
        total, norm = 0.0, 0.0
        constants = constants or (None,) * len(graphdefs)
        for graphdef, p, w, k, fc in zip(graphdefs, params, weights, constants, flips):
            pred = member_predictions(graphdef, p, x, tta, member_chunk, tta_in_batch, k, fc)
            total = total + jnp.einsum("m,mbhw->bhw", w, pred, precision=jax.lax.Precision.HIGHEST)
            norm = norm + w.sum()
        return total / norm

    def f_uncertainty(params, weights, x, constants=None):
        total, norm, views, log_scales = 0.0, 0.0, [], []
        constants = constants or (None,) * len(graphdefs)
        for graphdef, p, w, k, fc, h in zip(graphdefs, params, weights, constants, flips, heads):
            v, s = member_views(graphdef, p, x, tta, member_chunk, tta_in_batch, k, fc, h)
            # the mean as `f` computes it: each member's views averaged, then weighted
            pred = 0.5 * (v[:, 0] + v[:, 1]) if tta else v[:, 0]
            total = total + jnp.einsum("m,mbhw->bhw", w, pred, precision=jax.lax.Precision.HIGHEST)
            norm = norm + w.sum()
            views.append(v)
            log_scales.append(s)
        mean = total / norm
        n_views = sum(v.shape[0] * v.shape[1] for v in views)
        spread = uncertainty_lib.weighted_spread(views, weights, mean) if n_views > 1 else None
        scale = uncertainty_lib.weighted_scale(log_scales, weights)
        return mean, uncertainty_lib.combine(spread, scale)

    return f_uncertainty if uncertainty else f


# ---------------------------------------------------------------------------------------------
# Devices


def default_member_chunk(device: jax.Device) -> int | None:
    """Members run at once by default: on CPU one (``lax.map``: each member's activations stay in
    cache, faster than all vmapped; docs/performance.md); elsewhere all of them (None: vmap keeps
    an accelerator busy)."""
    return 1 if device.platform == "cpu" else None


def default_tta_in_batch(device: jax.Device) -> bool:
    """Whether the flipped copy rides in the same forward pass by default: not on CPU, where a
    forward pass of one sample is faster per sample than a batch of two (docs/performance.md);
    elsewhere yes (a larger batch keeps an accelerator busy)."""
    return device.platform != "cpu"


class Predictor:
    """Ensemble on a mesh: ``predict(x_local)`` -> (B_global, depth, x) float32 NumPy on every host.

    ``x_local`` is this host's slice (B_global / n_hosts, 6, T, R) of the global batch: float32, or
    float16 (sent as float16, half the bytes, and cast to float32 on the device, exactly); any other
    dtype is converted to float32 on the host. One compiled program per input dtype."""

    def __init__(
        self,
        groups: Sequence[Group],
        tta: bool = True,
        member_chunk: int | None = None,
        mesh: Mesh | None = None,
        tta_in_batch: bool | None = None,
        uncertainty: bool = False,
    ):
        """``member_chunk``: stacked members run at once, None = `default_member_chunk`;
        ``tta_in_batch``: see `member_predictions`, None = `default_tta_in_batch`;
        ``uncertainty``: results are (mean, confidence map) pairs (`ensemble_fn`)."""
        self.groups = list(groups)
        self.uncertainty = uncertainty
        self.mesh = mesh or sharding.data_mesh()
        device = self.mesh.devices.flat[0]
        if member_chunk is None:
            member_chunk = default_member_chunk(device)
        if tta_in_batch is None:
            tta_in_batch = default_tta_in_batch(device)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        replicated = sharding.replicated(self.mesh)
        self.params = jax.device_put(tuple(g.params for g in self.groups), replicated)
        self.weights = jax.device_put(tuple(g.weights for g in self.groups), replicated)
        # the zero channel's tokens per member, once for every batch (None for a group without
        # model.constant_channel_once)
        self.constants = jax.jit(
            lambda params: tuple(
                member_constants(g.graphdef, p) for g, p in zip(self.groups, params)
            ),
            out_shardings=replicated,
        )(self.params)
        self._fn = jax.jit(
            ensemble_fn(self.groups, tta, member_chunk, tta_in_batch, uncertainty),
            out_shardings=self.batch_sharding,
        )

    @property
    def n_devices(self) -> int:
        return self.mesh.devices.size

    def _global_batch(self, x_local: np.ndarray) -> jax.Array:
        x_local = np.asarray(x_local)
        if x_local.dtype not in (np.float16, np.float32):
            x_local = x_local.astype(np.float32)
        return sharding.host_to_global(self.mesh, x_local)

    def dispatch(self, x_local: np.ndarray) -> jax.Array:
        """Start the forward pass on a host batch; returns the (global, sharded) device result."""
        return self._fn(self.params, self.weights, self._global_batch(x_local), self.constants)

    def lower(self, x_local: np.ndarray) -> jax.stages.Lowered:
        """The program for batches like ``x_local``, lowered (``.compile()`` gives XLA's cost and
        memory analyses; scripts/bench_infer.py reports them)."""
        return self._fn.lower(
            self.params, self.weights, self._global_batch(x_local), self.constants
        )

    @staticmethod
    def fetch(y: Any) -> Any:
        """Device result (an array, or a tuple of them) -> the whole global batch as NumPy on
        every host."""
        if jax.process_count() == 1:
            return jax.tree.map(np.asarray, jax.device_get(y))
        from jax.experimental import multihost_utils

        return jax.tree.map(
            lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), y
        )

    def __call__(self, x_local: np.ndarray) -> np.ndarray:
        return self.fetch(self.dispatch(x_local))
