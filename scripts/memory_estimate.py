"""Memory estimate for one training step (forward, backward, optimiser update), compiled only.

Nothing is executed. Two figures per (attention, remat) setting, for the real model
(``fwi_jax.model.create_model``/``apply_model`` with model.attention, model.remat and model.dtype
overridden) and the real train step (``fwi_jax.train.make_train_step``: the config's loss,
optimiser, EMA and loss scale):

- "xla step": `compiled.memory_analysis()` of the whole jitted step compiled for the local
  backend (CPU here). XLA's CPU scheduler does not exploit rematerialisation (the figure barely
  moves between remat none and full while the FLOPs rise), so on CPU this is an upper bound,
  not what a GPU compile would assign.
- "peak": a liveness estimate = float32 training state (params, grads, AdamW moments, EMA)
  + the residuals the forward pass saves for the backward pass (exact: the shapes JAX keeps in
  the `jax.vjp` closure of the loss, which is where remat policies act)
  + the transient of the largest block's backward (XLA memory_analysis of one
  `fwi_jax.model.eva02.Block`'s recompute + vjp with the model's remat policy at the
  per-channel batch, 6 x batch sequences, or 5 x batch + 1 with
  model.constant_channel_once, compiled on its own).

    .venv/bin/python scripts/memory_estimate.py --config base_s6 --batch 8 --dtype float16 \
        --attention xla blockwise --remat none dots full
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import GIB

from fwi_jax.config import CHOICES, load_config
from fwi_jax.loss import get_loss
from fwi_jax.model import apply_model, create_model
from fwi_jax.optim import make_optimizer
from fwi_jax.train import create_train_state, make_train_step

# The estimate is for a GPU: the real model is built as a CUDA process builds it (model.attention
# auto -> blockwise, plain dense layers), then compiled for the local backend for the analysis.
PLATFORM = "cuda"


def _real(cfg):
    graphdef, params = create_model(cfg, seed=0, platform=PLATFORM)
    return params, lambda p, x: apply_model(graphdef, p, x)


def _real_block_vjp(cfg, batch: int):
    """(jitted vjp of one real ``eva02.Block`` at the per-channel batch with the model's remat
    policy, abstract block params, abstract tokens): the per-block backward transient."""
    from flax import nnx

    from fwi_jax.model.attention import resolve_impl
    from fwi_jax.model.eva02 import Block, rope_table
    from fwi_jax.model.fwi import DTYPES, model_size
    from fwi_jax.model.fwi import REMAT_POLICIES as MODEL_POLICIES

    m, geo = cfg.model, cfg.geometry
    size = model_size(cfg)
    dtype = DTYPES[m.dtype]
    impl = resolve_impl(m.attention, PLATFORM, size.dim // size.heads, dtype)
    block = nnx.eval_shape(
        lambda: Block(
            size,
            impl=impl,
            block_size=m.attention_block,
            dtype=dtype,
            platform=PLATFORM,
            rngs=nnx.Rngs(0),
        )
    )
    graphdef, state = nnx.split(block)
    sin, cos = rope_table(geo.grid, size.dim // size.heads, m.ref_feat_shape)

    def fwd(state, x):
        return nnx.merge(graphdef, state)(x, jnp.asarray(sin), jnp.asarray(cos))

    if m.remat in MODEL_POLICIES:
        fwd = jax.checkpoint(fwd, policy=MODEL_POLICIES[m.remat])
    n_tokens = 1 + geo.grid[0] * geo.grid[1]
    # sequences per block before the fusion: one per channel and sample, or 5 per sample and the
    # zero channel's one per step (model.constant_channel_once, `fwi_jax.model.fwi.constant_once`)
    from fwi_jax.model.fwi import constant_once

    channels = 5 if cfg.geometry.channels == 5 else 6
    rows = 5 * batch + 1 if constant_once(cfg) else channels * batch
    tokens = jax.ShapeDtypeStruct((rows, n_tokens, size.dim), dtype)
    vjp = jax.jit(lambda s, x, g: jax.vjp(fwd, s, x)[1](g))
    return vjp, state, tokens


def estimate(
    config: str, batch: int, dtype: str, impl: str, remat: str, block: int | None = None
) -> dict:
    overrides = [f"model.attention={impl}", f"model.remat={remat}", f"model.dtype={dtype}"]
    cfg = load_config(config, overrides + ([f"model.attention_block={block}"] if block else []))
    params, apply = _real(cfg)
    geo = cfg.geometry
    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    abstract = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    x_spec, v_spec = spec((batch, 6, geo.n_time, geo.n_receivers)), spec((batch, *geo.out_shape))
    # the real train step (forward, train.loss, backward, the config's optimiser, EMA, loss
    # scale), compiled for the local backend
    graphdef, _ = create_model(cfg, seed=0, platform=PLATFORM)
    tx, schedule = make_optimizer(cfg, total_steps=1000)
    train_step = make_train_step(cfg, graphdef, tx, schedule, ema_start_step=0)
    state = jax.eval_shape(lambda p: create_train_state(cfg, p, tx), abstract(params))
    compiled = (
        jax.jit(train_step, donate_argnums=0).lower(state, {"x": x_spec, "v": v_spec}).compile()
    )
    loss_fn = get_loss(cfg.train.loss)
    objective = lambda p, x, v: loss_fn(apply(p, x), v)
    block_vjp, block_state, tokens = _real_block_vjp(cfg, batch)
    n_state_copies = 5  # float32 params, grads, AdamW mu and nu, EMA
    # residuals saved for the backward pass (exact shapes, no execution)
    vjp_closure = jax.eval_shape(
        lambda p, x, v: jax.vjp(lambda p: objective(p, x, v), p)[1],
        abstract(params),
        x_spec,
        v_spec,
    )
    residual_bytes = sum(
        int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(vjp_closure)
    )
    block_mem = block_vjp.lower(block_state, tokens, tokens).compile().memory_analysis()
    transient_bytes = (
        block_mem.temp_size_in_bytes + 3 * int(np.prod(tokens.shape)) * tokens.dtype.itemsize
    )
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    state_bytes = n_state_copies * 4 * n_params
    return {
        "params": n_params,
        "state_copies": n_state_copies,
        "state_gib": state_bytes / GIB,
        "residual_gib": residual_bytes / GIB,
        "block_transient_gib": transient_bytes / GIB,
        "peak_gib": (state_bytes + residual_bytes + transient_bytes) / GIB,
        "temp_gib": mem.temp_size_in_bytes / GIB,
        "args_gib": mem.argument_size_in_bytes / GIB,
        "out_gib": mem.output_size_in_bytes / GIB,
        "alias_gib": mem.alias_size_in_bytes / GIB,
        "total_gib": (
            mem.temp_size_in_bytes
            + mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
        )
        / GIB,
        "tflop": (cost or {}).get("flops", float("nan")) / 1e12,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="base_s6")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attention", nargs="+", default=["xla", "blockwise"])
    parser.add_argument(
        "--remat", nargs="+", default=["none", "dots", "full"], choices=CHOICES["model.remat"]
    )
    # the only one
    parser.add_argument(
        "--blocks",
        nargs="+",
        type=int,
        default=[None],
        help="blockwise key block sizes (default: config's)",
    )
    args = parser.parse_args()
    rows = []
    for impl, remat, block in itertools.product(args.attention, args.remat, args.blocks):
        r = estimate(args.config, args.batch, args.dtype, impl, remat, block)
        impl = f"{impl} (block {block})" if impl == "blockwise" and block else impl
        rows.append((impl, remat, r))
        print(f"{impl} remat={remat}: {r}", flush=True)
    print("\nfloat32 state = params, grads, AdamW mu and nu, EMA (x5)")
    print(
        f"\nXLA memory estimate ({jax.devices()[0].platform} compile, not executed), "
        f"{args.config}, "
        f"batch {args.batch}, {args.dtype} ({rows[0][2]['params'] / 1e6:.1f} M params)\n"
    )
    print(
        "| attention | remat | saved residuals GiB | block bwd transient GiB | float32 state GiB "
        "| **peak estimate GiB** | XLA CPU whole-step GiB (upper bound) | XLA TFLOP/step |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for impl, remat, r in rows:
        print(
            f"| {impl} | {remat} | {r['residual_gib']:.1f} | {r['block_transient_gib']:.1f} | "
            f"{r['state_gib']:.1f} "
            f"| **{r['peak_gib']:.1f}** | {r['total_gib']:.1f} | {r['tflop']:.2f} |"
        )


if __name__ == "__main__":
    main()
