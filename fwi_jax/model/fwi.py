"""The split EVA02 velocity model of the reference solution (reference §3).

x (B, 6, n_time, n_receivers) float32 (reference §2 steps 1-3 done) -> fold + bilinear resize ->
(B, 6, H, W) -> per channel: patch tokens + cls + pos-embed -> blocks[:split] (shared weights,
channels folded into the batch) -> channel fusion (``model.fusion``: mean, or attention across
channels, `fwi_jax.model.fusion`) -> blocks[split:] -> drop cls -> head -> sigmoid * v_span +
v_min (float32) -> velocity (B, depth, x) km/s.

``geometry.head``: ``pixel_shuffle`` (the reference: Linear(dim -> head_h*head_w) per token, pixel
shuffle, crop) or ``token_linear`` (the first place: Linear(dim -> x) per token, the token axis
area-resized to depth). ``geometry.channels=5`` drops the zero channel first; ``input_scale``
rescales amplitudes (the first place's inputs are 10x smaller than the reference's). The demo's
additions, off in the reference's configs: ``geometry.time_power`` (a t-power gain on the input)
and ``model.depth_prior`` (a trained per-depth logit added before the sigmoid); off everywhere
but where a config turns it on, ``model.error_head``: a second head of the same kind, on the
tokens (their gradient stopped unless ``model.error_head_joint``) plus a per-depth bias, painting
the log-scale of the relative error (``log_scale=True``; `fwi_jax.uncertainty`).

With ``model.constant_channel_once`` (the default; six channels and mean fusion only) only the five
shots run per sample; the all-zero channel 151, whose tokens after blocks[:split] are a function of
the parameters alone, is `FWIModel.constant_tokens` (1, 1 + N, dim), computed once per call or
passed in (an ensemble computes it once per member) and added into the channel mean. Same result,
within float32 rounding (a different summation order of the mean).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from fwi_jax.config import Config, ConfigError
from fwi_jax.model import onednn
from fwi_jax.model.attention import ATTENTION_RESIDUALS, resolve_impl
from fwi_jax.model.cpu_kernel import KernelBuildError
from fwi_jax.model.eva02 import SIZES, Block, EvaSize, rope_table
from fwi_jax.model.fusion import ChannelFusionDual, ChannelFusionSingle
from fwi_jax.model.layers import OUTPUT_NAME as DENSE_OUTPUT
from fwi_jax.model.layers import linear
from fwi_jax.model.target import target_platform
from fwi_jax.preprocess import CHANNEL_POSITIONS, area_matrix, fold_and_resize, shot_channels

ERROR_PRIOR_START = -3.0  # the error head's log-scale before training: exp(-3) = 0.0498
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # the weight matmuls' outputs (plain dots, or layers.dense's tagged outputs on CPU), plus
    # attention's output and log-sum-exp (small: (B, N, dim) and (B, H, N)) so that the backward
    # pass does not run attention's forward again
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*ATTENTION_RESIDUALS, DENSE_OUTPUT),
    ),
}


def _scan_blocks(blocks, x, sin, cos, policy):
    """``blocks`` (identical structure) applied in order as one ``lax.scan`` over their stacked
    weights, each iteration under ``jax.checkpoint(policy)`` when a policy is given. The weights
    stay one module per block (the converter's names); stacking them per call costs a copy of
    the stack's weights. Written out because nnx's own scan wants weights created stacked."""
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.split(b)[1] for b in blocks]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

    def body(h, state):
        return nnx.merge(graphdef, state)(h, sin, cos), None

    if policy is not None:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, _ = jax.lax.scan(body, x, stacked)
    return x


def model_size(cfg: Config) -> EvaSize:
    """timm's widths for ``cfg.model.size`` with the config's dim/depth/heads overrides."""
    m = cfg.model
    size = SIZES[m.size]  # config.CHOICES, validated when the config is loaded
    size = dataclasses.replace(
        size,
        **{
            k: v
            for k, v in (("dim", m.dim), ("depth", m.depth), ("heads", m.heads))
            if v is not None
        },
    )
    if not 0 <= m.split <= size.depth:
        raise ConfigError(f"model.split={m.split} must lie in [0, depth={size.depth}]")
    if size.dim % size.heads or (size.dim // size.heads) % 4:
        raise ConfigError(
            f"model: dim {size.dim} / heads {size.heads} must give a head_dim divisible by 4"
        )
    m.validate()
    for key in ("fusion_heads", "fusion_query_heads"):
        if m.fusion != "mean" and size.dim % getattr(m, key):
            raise ConfigError(f"model.{key}={getattr(m, key)} does not divide dim {size.dim}")
    return size


def constant_once(cfg: Config) -> bool:
    """Whether the zero channel runs once per call: ``model.constant_channel_once`` where the
    model sees that channel (``geometry.channels=6``) and fuses by the mean."""
    m = cfg.model
    return m.constant_channel_once and cfg.geometry.channels == 6 and m.fusion == "mean"


class FWIModel(nnx.Module):
    """The model of ``cfg`` for programs compiled for ``platform`` (cpu, cuda, rocm, tpu; None:
    this process's default backend), which decides ``model.attention=auto``, ``model.dense=auto``
    and the dense layers' backward pass (`fwi_jax.model.target`)."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, platform: str | None = None):
        g, m = cfg.geometry, cfg.model
        self.cfg = cfg
        size = model_size(cfg)
        dtype = DTYPES[m.dtype]
        self.dtype = dtype
        platform = target_platform(platform)
        try:
            impl = resolve_impl(m.attention, platform, size.dim // size.heads, dtype)
        except ValueError as err:
            raise ConfigError(f"model.attention={m.attention!r}: {err}") from None
        try:
            dense = onednn.resolve(m.dense, platform, dtype)
        except (ValueError, KernelBuildError) as err:
            raise ConfigError(f"model.dense={m.dense!r}: {err}") from None
        p = g.patch
        gh, gw = g.grid
        self.patch_embed = nnx.Dict(
            proj=linear(p * p, size.dim, dtype=dtype, rngs=rngs, platform=platform, dense=dense)
        )
        self.cls_token = nnx.Param(
            0.02 * jax.random.truncated_normal(rngs.params(), -2, 2, (1, 1, size.dim))
        )
        self.pos_embed = nnx.Param(
            0.02 * jax.random.truncated_normal(rngs.params(), -2, 2, (1, 1 + gh * gw, size.dim))
        )
        self.blocks = nnx.List(
            [
                Block(
                    size,
                    impl=impl,
                    block_size=m.attention_block,
                    dtype=dtype,
                    platform=platform,
                    dense=dense,
                    rngs=rngs,
                )
                for _ in range(size.depth)
            ]
        )
        if m.fusion == "mha_single":
            self.channel_fusion_mha = ChannelFusionSingle(
                size.dim, g.channels, m.fusion_heads, dtype=dtype, platform=platform, rngs=rngs
            )
        elif m.fusion == "mha_dual":
            self.channel_fusion_mha = ChannelFusionDual(
                size.dim,
                g.channels,
                m.fusion_heads,
                m.fusion_query_heads,
                dtype=dtype,
                platform=platform,
                rngs=rngs,
            )
        hp, wp = g.head_patch
        head_out = g.out_shape[1] if g.head == "token_linear" else hp * wp
        self.head = linear(
            size.dim,
            head_out,
            dtype=dtype,
            rngs=rngs,
            platform=platform,
            dense=dense,
            kernel_init=nnx.initializers.truncated_normal(0.02),
        )
        self.head_dim = size.dim // size.heads
        if m.depth_prior:  # (depth,) logits, set from the data by `fwi_jax.train.depth_profile`;
            # 1-D, so no weight decay and Adam under Muon, as the other biases
            self.depth_prior = nnx.Param(jnp.zeros((g.out_shape[0],), jnp.float32))
        if m.error_head:  # created last: the other parameters draw the same values without it
            self.error_head = linear(
                size.dim,
                head_out,
                dtype=dtype,
                rngs=rngs,
                platform=platform,
                dense=dense,
                kernel_init=nnx.initializers.zeros_init(),
            )
            # (depth,) log-scale per depth row, started at log(0.05): a 5 % relative error
            self.error_prior = nnx.Param(
                jnp.full((g.out_shape[0],), ERROR_PRIOR_START, jnp.float32)
            )

    def _run_blocks(self, blocks, x):
        g = self.cfg.geometry
        sin, cos = (
            jnp.asarray(t) for t in rope_table(g.grid, self.head_dim, self.cfg.model.ref_feat_shape)
        )
        policy = REMAT_POLICIES.get(self.cfg.model.remat)
        if self.cfg.model.scan_blocks and len(blocks) > 1:
            return _scan_blocks(blocks, x, sin, cos, policy)
        for block in blocks:
            if policy is None:
                x = block(x, sin, cos)
            else:
                x = nnx.remat(lambda blk, h: blk(h, sin, cos), policy=policy)(block, x)
        return x

    def _tokens(self, img: jax.Array) -> jax.Array:
        """Images (n, H, W) float32 -> patch tokens + cls + pos-embed (n, 1 + N, dim)."""
        p, (gh, gw) = self.cfg.geometry.patch, self.cfg.geometry.grid
        n = img.shape[0]
        patches = img.reshape(n, gh, p, gw, p).transpose(0, 1, 3, 2, 4).reshape(n, gh * gw, p * p)
        tokens = self.patch_embed["proj"](patches.astype(self.dtype))
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (n, 1, tokens.shape[-1]))
        return jnp.concatenate([cls, tokens], axis=1) + self.pos_embed[...].astype(self.dtype)

    def constant_tokens(self) -> jax.Array:
        """The all-zero channel's tokens after blocks[:split], (1, 1 + N, dim) in the compute
        dtype: zeros stay zeros through fold and resize, so this is the patch embedding's bias
        plus cls and pos-embed through the blocks, a function of the parameters alone."""
        g = self.cfg.geometry
        zeros = jnp.zeros((1, *g.resize), jnp.float32)
        return self._run_blocks(self.blocks[: self.cfg.model.split], self._tokens(zeros))

    def __call__(
        self, x: jax.Array, constant: jax.Array | None = None, log_scale: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """x (B, 6, n_time, n_receivers) -> velocity (B, depth, x) km/s float32. ``constant``:
        `constant_tokens` of these parameters, when the caller has them (else computed here);
        unused with ``model.constant_channel_once`` off. ``log_scale`` (``model.error_head``
        only): (velocity, s) with s (B, depth, x) float32 the error head's log-scale of the
        relative error, computed from the tokens (their gradient stopped unless
        ``model.error_head_joint``)."""
        if log_scale and not self.cfg.model.error_head:
            raise ValueError("log_scale needs model.error_head=true")
        g, m = self.cfg.geometry, self.cfg.model
        b, c = x.shape[:2]
        if x.shape[2:] != (g.n_time, g.n_receivers):
            raise ValueError(f"model input {x.shape}: expected (B, C, {g.n_time}, {g.n_receivers})")
        once = constant_once(self.cfg)
        if g.channels == 5 or once:
            if c != len(CHANNEL_POSITIONS):
                raise ValueError(
                    f"model input {x.shape}: expected the {len(CHANNEL_POSITIONS)} "
                    f"channels of {CHANNEL_POSITIONS}"
                )
            x = shot_channels(x)  # (B, 5, T, R): the five shots in input order
        n = x.shape[1]
        # float16 input (a float16 packed store's batches) becomes float32 here, exactly
        x = x.astype(jnp.float32)
        if g.input_scale != 1.0:
            x = x * jnp.float32(g.input_scale)
        if g.time_power:
            t = (jnp.arange(g.n_time, dtype=jnp.float32) + 0.5) * (2.0 / g.n_time)
            x = x * (t**g.time_power)[:, None]
        img = fold_and_resize(x, g.fold, g.resize)  # (B, n, H, W)
        tokens = self._tokens(img.reshape(b * n, *g.resize))
        tokens = self._run_blocks(self.blocks[: m.split], tokens)  # channels share weights
        tokens = tokens.reshape(b, n, *tokens.shape[1:])  # (B, n, 1 + N, dim)
        if m.fusion != "mean":  # attention across the channels of each token
            tokens = self.channel_fusion_mha(tokens)
        elif once:  # fuse channels (cls included): the five shots and the zero channel, mean of c
            if constant is None:
                constant = self.constant_tokens()
            total = tokens.sum(axis=1, dtype=jnp.float32) + constant.astype(jnp.float32)
            tokens = (total / c).astype(tokens.dtype)
        else:
            tokens = tokens.mean(axis=1)  # fuse channels (cls included)
        tokens = self._run_blocks(self.blocks[m.split :], tokens)
        velocity = self._velocity(self._paint(self.head, tokens))
        if not log_scale:
            return velocity
        if not m.error_head_joint:  # the likelihood trains the error head alone
            tokens = jax.lax.stop_gradient(tokens)
        s = self._paint(self.error_head, tokens)
        return velocity, s + self.error_prior[...][:, None]

    def _paint(self, head, tokens: jax.Array) -> jax.Array:
        """Tokens (B, 1 + N, dim) through ``head`` -> (B, depth, x) float32 values per pixel."""
        g = self.cfg.geometry
        b = tokens.shape[0]
        if g.head == "token_linear":
            cols = head(tokens[:, 1:]).astype(jnp.float32)  # (B, N, x)
            area = jnp.asarray(area_matrix(cols.shape[1], g.out_shape[0]))  # (depth, N)
            return jnp.einsum("dn,bnw->bdw", area, cols, precision=jax.lax.Precision.HIGHEST)
        pix = head(tokens[:, 1:])  # (B, N, hp*wp), channel i*wp + j -> offset (i, j)
        hp, wp = g.head_patch
        gh, gw = g.grid
        pix = pix.reshape(b, gh, gw, hp, wp).transpose(0, 1, 3, 2, 4).reshape(b, gh * hp, gw * wp)
        (r0, c0), (oh, ow) = g.crop_offset, g.out_shape
        return pix[:, r0 : r0 + oh, c0 : c0 + ow].astype(jnp.float32)

    def _velocity(self, logits: jax.Array) -> jax.Array:
        """(B, depth, x) float32 logits -> km/s in (v_min, v_min + v_span)."""
        m = self.cfg.model
        if m.depth_prior:
            logits = logits + self.depth_prior[...][:, None]
        return jax.nn.sigmoid(logits) * m.v_span + m.v_min
