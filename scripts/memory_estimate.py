"""Memory estimate for one training step (forward, backward, AdamW update), compiled only.

Nothing is executed. Two figures per (attention, remat) setting:

- "xla step": `compiled.memory_analysis()` of the whole jitted step compiled for the local
  backend (CPU here). XLA's CPU scheduler does not exploit rematerialisation (the figure barely
  moves between remat none and full while the FLOPs rise), so on CPU this is an upper bound,
  not what a GPU compile would assign.
- "peak": a liveness estimate = float32 training state (params, grads, AdamW moments, and the
  EMA copy for --model real)
  + the residuals the forward pass saves for the backward pass (exact: the shapes JAX keeps in
  the `jax.vjp` closure of the loss, which is where remat policies act)
  + the transient of the largest block's backward (XLA memory_analysis of one block's
  recompute + vjp at the per-channel batch, 6 x batch sequences, compiled on its own: the real
  `fwi_jax.model.eva02.Block` with the model's remat policy for --model real, the stand-in's
  block for --model standin).

    .venv/bin/python scripts/memory_estimate.py --config base_s6 --batch 8 --dtype float16 \
        --attention xla blockwise --remat none dots full
    .venv/bin/python scripts/memory_estimate.py --model standin ...   # the historical stand-in

--model real (default) uses the real model (fwi_jax.model.create_model/apply_model with
model.attention, model.remat and model.dtype overridden), the config's loss (train.loss) and the
real train step (fwi_jax.train.make_train_step with the config's optimiser, EMA and loss scale)
for the whole-step compile. --model standin uses a shape-faithful EVA02 stand-in
written here (patch embedding, cls + pos, pre-LN blocks with q/k/v, RoPE-free attention,
SwiGLU MLP with its LayerNorm, channel fold/mean at the split, per-token head + pixel shuffle),
remat applied per block with jax.checkpoint; its parameter count is printed so it can be
checked against the real model's.
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fwi_jax.config import load_config
from fwi_jax.model.attention import attention

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
WIDTHS = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
# The estimate is for a GPU: the real model is built as a CUDA process builds it (model.attention
# auto -> blockwise, plain dense layers), then compiled for the local backend for the analysis.
PLATFORM = "cuda"


def _standin(cfg, dtype, impl, block_size, remat):
    """(params, apply(params, x) -> (B, 1259, 300)) for an EVA02-shaped stand-in model."""
    dim, depth, heads = WIDTHS[cfg.model.size]
    geo = cfg.geometry
    gh, gw = geo.grid
    hidden = int(dim * 4 * 2 / 3)
    rng = np.random.default_rng(0)
    w = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32) * 0.02)
    block_params = lambda: {
        "norm1": (jnp.ones(dim), jnp.zeros(dim)), "q": w(dim, dim), "k": w(dim, dim), "v": w(dim, dim),
        "qv_bias": w(2, dim), "proj": w(dim, dim), "norm2": (jnp.ones(dim), jnp.zeros(dim)),
        "fc1_g": w(dim, hidden), "fc1_x": w(dim, hidden), "mlp_norm": (jnp.ones(hidden), jnp.zeros(hidden)),
        "fc2": w(hidden, dim),
    }
    params = {
        "patch": w(geo.patch * geo.patch, dim), "cls": w(1, 1, dim), "pos": w(1, 1 + gh * gw, dim),
        "blocks": [block_params() for _ in range(depth)], "head": w(dim, geo.head_patch[0] * geo.head_patch[1]),
    }

    def ln(x, p):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
        return (((x32 - mean) * jax.lax.rsqrt(var + 1e-6)) * p[0] + p[1]).astype(dtype)

    def block(x, p):
        p = jax.tree.map(lambda a: a.astype(dtype), p)
        b, n, _ = x.shape
        y = ln(x, p["norm1"])
        split = lambda t: t.reshape(b, n, heads, dim // heads)
        q = split(y @ p["q"] + p["qv_bias"][0])
        k = split(y @ p["k"])
        v = split(y @ p["v"] + p["qv_bias"][1])
        x = x + attention(q, k, v, impl=impl, block_size=block_size).reshape(b, n, dim) @ p["proj"]
        y = ln(x, p["norm2"])
        y = ln(jax.nn.silu(y @ p["fc1_g"]) * (y @ p["fc1_x"]), p["mlp_norm"])
        return x + y @ p["fc2"]

    if remat != "none":
        block = jax.checkpoint(block, policy=REMAT_POLICIES[remat])

    def apply(params, x):
        b, c, t, r = x.shape  # (B, 6, 10000, 31)
        img = x.reshape(b * c, t // geo.fold, geo.fold * r)  # fold time into receivers
        img = jax.image.resize(img, (b * c, *geo.resize), "bilinear").astype(dtype)
        patches = img.reshape(b * c, gh, geo.patch, gw, geo.patch).transpose(0, 1, 3, 2, 4)
        tok = patches.reshape(b * c, gh * gw, -1) @ params["patch"].astype(dtype)
        tok = jnp.concatenate([jnp.broadcast_to(params["cls"].astype(dtype), (b * c, 1, dim)), tok], 1)
        tok = tok + params["pos"].astype(dtype)
        for i, p in enumerate(params["blocks"]):
            if i == cfg.model.split:
                tok = tok.reshape(b, c, *tok.shape[1:]).astype(jnp.float32).mean(1).astype(dtype)
            tok = block(tok, p)
        out = (tok[:, 1:] @ params["head"].astype(dtype)).astype(jnp.float32)
        ph, pw = geo.head_patch
        out = out.reshape(b, gh, gw, ph, pw).transpose(0, 1, 3, 2, 4).reshape(b, gh * ph, gw * pw)
        (r0, c0), (oh, ow) = geo.crop_offset, geo.out_shape
        return jax.nn.sigmoid(out[:, r0:r0 + oh, c0:c0 + ow]) * cfg.model.v_span + cfg.model.v_min

    apply.block = block  # for the per-block transient estimate
    apply.block_params = params["blocks"][0]
    apply.dim = dim
    return params, apply


def _real(cfg):
    from fwi_jax.model import apply_model, create_model

    graphdef, params = create_model(cfg, seed=0, platform=PLATFORM)
    return params, lambda p, x: apply_model(graphdef, p, x)


def _real_block_vjp(cfg, batch: int):
    """(jitted vjp of one real ``eva02.Block`` at the per-channel batch with the model's remat
    policy, abstract block params, abstract tokens): the per-block backward transient."""
    from flax import nnx

    from fwi_jax.model.attention import resolve_impl
    from fwi_jax.model.eva02 import Block, rope_table
    from fwi_jax.model.fwi import DTYPES, REMAT_POLICIES as MODEL_POLICIES, model_size

    m, geo = cfg.model, cfg.geometry
    size = model_size(cfg)
    dtype = DTYPES[m.dtype]
    impl = resolve_impl(m.attention, PLATFORM, size.dim // size.heads, dtype)
    block = nnx.eval_shape(lambda: Block(size, impl=impl, block_size=m.attention_block, dtype=dtype,
                                         platform=PLATFORM, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(block)
    sin, cos = rope_table(geo.grid, size.dim // size.heads, m.ref_feat_shape)

    def fwd(state, x):
        return nnx.merge(graphdef, state)(x, jnp.asarray(sin), jnp.asarray(cos))

    if m.remat in MODEL_POLICIES:
        fwd = jax.checkpoint(fwd, policy=MODEL_POLICIES[m.remat])
    n_tokens = 1 + geo.grid[0] * geo.grid[1]
    tokens = jax.ShapeDtypeStruct((6 * batch, n_tokens, size.dim), dtype)
    vjp = jax.jit(lambda s, x, g: jax.vjp(fwd, s, x)[1](g))
    return vjp, state, tokens


def estimate(config: str, batch: int, dtype: str, impl: str, remat: str, model: str, time_steps: int = 0,
             block: int | None = None) -> dict:
    overrides = [f"model.attention={impl}", f"model.remat={remat}", f"model.dtype={dtype}"]
    cfg = load_config(config, overrides + ([f"model.attention_block={block}"] if block else []))
    if model == "real":
        params, apply = _real(cfg)
    else:
        params, apply = _standin(cfg, jnp.dtype(dtype), impl, cfg.model.attention_block, remat)
    geo = cfg.geometry
    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    abstract = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    x_spec, v_spec = spec((batch, 6, geo.n_time, geo.n_receivers)), spec((batch, *geo.out_shape))
    if model == "real":
        # the real train step (fwi_jax.train.make_train_step: forward, train.loss, backward, the
        # config's AdamW, EMA, loss scale), compiled for the local backend
        from fwi_jax.loss import get_loss
        from fwi_jax.model import create_model
        from fwi_jax.optim import make_optimizer
        from fwi_jax.train import create_train_state, make_train_step

        graphdef, _ = create_model(cfg, seed=0, platform=PLATFORM)
        tx, schedule = make_optimizer(cfg, total_steps=1000)
        train_step = make_train_step(cfg, graphdef, tx, schedule, ema_start_step=0)
        state = jax.eval_shape(lambda p: create_train_state(cfg, p, tx), abstract(params))
        compiled = jax.jit(train_step, donate_argnums=0).lower(state, {"x": x_spec, "v": v_spec}).compile()
        loss_fn = get_loss(cfg.train.loss)
        v0 = jnp.zeros(v_spec.shape, jnp.float32)
        objective = lambda p, x, v: loss_fn(apply(p, x), v)
        block_vjp, block_state, tokens = _real_block_vjp(cfg, batch)
        block_args = (block_state, tokens, tokens)
        n_state_copies = 5  # float32 params, grads, AdamW mu and nu, EMA
    else:
        depth_w = jnp.linspace(1.0, 0.25, geo.out_shape[0])[:, None]
        tx = optax.adamw(1e-4)

        def step(params, opt_state, x, v):
            def loss_fn(p):
                pred = apply(p, x)
                return jnp.mean(jnp.abs(pred - v) / v * depth_w)  # SPEC §4 base loss

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        opt_state = jax.eval_shape(tx.init, params)
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(abstract(params), opt_state, x_spec, v_spec).compile()
        objective = lambda p, x, v: jnp.sum(apply(p, x))
        # transient of one per-channel block's backward (recompute + vjp), compiled alone
        _, standin = _standin(cfg, jnp.dtype(dtype), impl, cfg.model.attention_block, remat)
        n_tokens = 1 + geo.grid[0] * geo.grid[1]
        block_vjp = jax.jit(lambda x, p, g: jax.vjp(standin.block, x, p)[1](g))
        tokens = jax.ShapeDtypeStruct((6 * batch, n_tokens, standin.dim), jnp.dtype(dtype))
        block_args = (tokens, abstract(standin.block_params), tokens)
        n_state_copies = 4  # float32 params, grads, AdamW mu and nu
    # residuals saved for the backward pass (exact shapes, no execution)
    vjp_closure = jax.eval_shape(lambda p, x, v: jax.vjp(lambda p: objective(p, x, v), p)[1], abstract(params),
                                 x_spec, v_spec)
    residual_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(vjp_closure))
    block_mem = block_vjp.lower(*block_args).compile().memory_analysis()
    transient_bytes = block_mem.temp_size_in_bytes + 3 * int(np.prod(tokens.shape)) * tokens.dtype.itemsize
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    gib = 2.0**30
    timing = {}
    if time_steps and model == "standin":  # optional: run the compiled step and the forward alone
        import time

        x = jax.random.normal(jax.random.key(0), (batch, 6, geo.n_time, geo.n_receivers))
        v = jnp.full((batch, *geo.out_shape), 3.0)
        fwd = jax.jit(apply)
        jax.block_until_ready(fwd(params, x))
        start = time.perf_counter()
        for _ in range(time_steps):
            jax.block_until_ready(fwd(params, x))
        timing["fwd_samples_s"] = batch * time_steps / (time.perf_counter() - start)
        p, o = jax.tree.map(jnp.array, params), tx.init(params)
        p, o, _ = compiled(p, o, x, v)
        jax.block_until_ready(p)
        start = time.perf_counter()
        for _ in range(time_steps):
            p, o, loss = compiled(p, o, x, v)
        jax.block_until_ready(loss)
        timing["train_samples_s"] = batch * time_steps / (time.perf_counter() - start)
    state_bytes = n_state_copies * 4 * n_params
    return timing | {
        "params": n_params,
        "state_copies": n_state_copies,
        "state_gib": state_bytes / gib,
        "residual_gib": residual_bytes / gib,
        "block_transient_gib": transient_bytes / gib,
        "peak_gib": (state_bytes + residual_bytes + transient_bytes) / gib,
        "temp_gib": mem.temp_size_in_bytes / gib,
        "args_gib": mem.argument_size_in_bytes / gib,
        "out_gib": mem.output_size_in_bytes / gib,
        "alias_gib": mem.alias_size_in_bytes / gib,
        "total_gib": (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
                      - mem.alias_size_in_bytes) / gib,
        "tflop": (cost or {}).get("flops", float("nan")) / 1e12,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="base_s6")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attention", nargs="+", default=["xla", "blockwise"])
    parser.add_argument("--remat", nargs="+", default=["none", "dots", "full"], choices=sorted(REMAT_POLICIES))
    parser.add_argument("--model", default="real", choices=["real", "standin"])
    parser.add_argument("--blocks", nargs="+", type=int, default=[None], help="blockwise key block sizes (default: config's)")
    parser.add_argument("--time", type=int, default=0, metavar="STEPS",  # --model standin only
                        help="also execute: time the train step and the forward over STEPS steps")
    args = parser.parse_args()
    rows = []
    for impl, remat, block in itertools.product(args.attention, args.remat, args.blocks):
        r = estimate(args.config, args.batch, args.dtype, impl, remat, args.model, args.time, block)
        impl = f"{impl} (block {block})" if impl == "blockwise" and block else impl
        rows.append((impl, remat, r))
        print(f"{impl} remat={remat}: {r}", flush=True)
    print(f"\nfloat32 state = params, grads, AdamW mu and nu (x4){', EMA (x5)' if args.model == 'real' else ''}")
    print(f"\nXLA memory estimate ({jax.devices()[0].platform} compile, not executed), {args.config}, "
          f"batch {args.batch}, {args.dtype}, model {args.model} ({rows[0][2]['params'] / 1e6:.1f} M params)\n")
    print("| attention | remat | saved residuals GiB | block bwd transient GiB | float32 state GiB "
          "| **peak estimate GiB** | XLA CPU whole-step GiB (upper bound) | XLA TFLOP/step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for impl, remat, r in rows:
        print(f"| {impl} | {remat} | {r['residual_gib']:.1f} | {r['block_transient_gib']:.1f} | {r['state_gib']:.1f} "
              f"| **{r['peak_gib']:.1f}** | {r['total_gib']:.1f} | {r['tflop']:.2f} |")


if __name__ == "__main__":
    main()
