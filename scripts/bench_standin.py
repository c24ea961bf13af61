"""Samples/s of an EVA02-shaped JAX stand-in vs timm's EVA02 in PyTorch, in one run.

A proxy until fwi_jax.model / fwi_jax.train exist (then scripts/bench_train.py and
scripts/bench_infer.py are the real figures). Both sides run the split model's block structure:
6 channels through blocks[0:split] (batch 6 x batch), mean over channels, blocks[split:], a per-token
head with sigmoid; train = forward + backward + AdamW step. PyTorch side: timm's
eva02_<size>_patch14 with img_size (1260, 308), in_chans 1, fused attention, RoPE, random init,
fed an already resized image (no resize cost, favouring PyTorch slightly). JAX side:
scripts/memory_estimate.py's stand-in (fold + bilinear resize inside, no RoPE).

    .venv/bin/python scripts/bench_standin.py --config tiny_s8 --batch 1 --steps 3 \
        --attention blockwise xla
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from memory_estimate import estimate  # noqa: E402

from fwi_jax.config import load_config  # noqa: E402


def torch_samples_per_s(config: str, batch: int, steps: int) -> tuple[float, float]:
    import timm
    import torch

    cfg = load_config(config)
    torch.manual_seed(0)
    model = timm.create_model(f"eva02_{cfg.model.size}_patch14_224", pretrained=False, img_size=cfg.geometry.resize,
                              num_classes=0, in_chans=1)
    head = torch.nn.Linear(model.embed_dim, cfg.geometry.head_patch[0] * cfg.geometry.head_patch[1])
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), 1e-4)
    split = cfg.model.split

    def forward(x):  # x (B*6, 1, H, W)
        t = model.patch_embed(x)
        t = torch.cat([model.cls_token.expand(t.shape[0], -1, -1), t], 1) + model.pos_embed
        rope = model.rope.get_embed()
        for blk in model.blocks[:split]:
            t = blk(t, rope=rope)
        t = t.reshape(batch, 6, *t.shape[1:]).mean(1)
        for blk in model.blocks[split:]:
            t = blk(t, rope=rope)
        return torch.sigmoid(head(t[:, 1:])) * 3 + 1.5

    x = torch.randn(batch * 6, 1, *cfg.geometry.resize)

    def timed(fn):
        fn()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        return batch * steps / (time.perf_counter() - start)

    def fwd():
        with torch.no_grad():
            forward(x)

    def train():
        opt.zero_grad()
        forward(x).mean().backward()
        opt.step()

    return timed(fwd), timed(train)


def breakdown(config: str, block_size: int) -> None:
    """Time the pieces of the JAX stand-in (float32): resize, one per-channel block, its attention."""
    import statistics

    import jax
    import jax.numpy as jnp

    from fwi_jax.model.attention import attention
    from memory_estimate import WIDTHS, _standin

    cfg = load_config(config)
    dim, _, heads = WIDTHS[cfg.model.size]
    n = 1 + cfg.geometry.grid[0] * cfg.geometry.grid[1]

    def median_s(fn, repeats=3):
        jax.block_until_ready(fn())
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    _, apply = _standin(cfg, jnp.float32, "blockwise", block_size, "none")
    x = jax.random.normal(jax.random.key(0), (6, n, dim))
    img = jax.random.normal(jax.random.key(1), (6, cfg.geometry.n_time // cfg.geometry.fold,
                                                 cfg.geometry.n_receivers * cfg.geometry.fold))
    resize = jax.jit(lambda a: jax.image.resize(a, (6, *cfg.geometry.resize), "bilinear"))
    block_fwd = jax.jit(apply.block)
    block_grad = jax.jit(jax.grad(lambda x, p: apply.block(x, p).sum(), argnums=(0, 1)))
    q = jax.random.normal(jax.random.key(2), (6, n, heads, dim // heads))
    attn_fwd = jax.jit(lambda q: attention(q, q, q, impl="blockwise", block_size=block_size))
    attn_grad = jax.jit(jax.grad(lambda q, k, v: attention(q, k, v, impl="blockwise", block_size=block_size).sum(),
                                 argnums=(0, 1, 2)))
    t_resize = median_s(lambda: resize(img))
    t_bf, t_bg = median_s(lambda: block_fwd(x, apply.block_params)), median_s(lambda: block_grad(x, apply.block_params))
    t_af, t_ag = median_s(lambda: attn_fwd(q)), median_s(lambda: attn_grad(q, q, q))
    calls = (cfg.model.split * 6 + (12 - cfg.model.split)) / 6  # block calls over 6 sequences per sample
    print(f"\nBreakdown, JAX stand-in {config}, float32, blockwise block {block_size} (noisy)\n")
    print("| piece | fwd ms | fwd+bwd ms |")
    print("|---|---:|---:|")
    print(f"| fold + resize, 1 sample (6 channels) | {t_resize * 1e3:.0f} | - |")
    print(f"| one block, 6 sequences | {t_bf * 1e3:.0f} | {t_bg * 1e3:.0f} |")
    print(f"| of which attention | {t_af * 1e3:.0f} ({t_af / t_bf:.0%}) | {t_ag * 1e3:.0f} ({t_ag / t_bg:.0%}) |")
    print(f"| of which the rest (linears, LayerNorms, SwiGLU) | {(t_bf - t_af) * 1e3:.0f} | {(t_bg - t_ag) * 1e3:.0f} |")
    print(f"| blocks per sample ({calls:.2f} x the row above) | {calls * t_bf * 1e3:.0f} | {calls * t_bg * 1e3:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny_s8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--attention", nargs="+", default=["blockwise", "xla"])
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--breakdown", action="store_true", help="only time the stand-in's pieces")
    args = parser.parse_args()
    if args.breakdown:
        breakdown(args.config, args.block)
        return
    rows = []
    t_fwd, t_train = torch_samples_per_s(args.config, args.batch, args.steps)
    rows.append(("PyTorch timm (fused SDPA)", t_fwd, t_train))
    print(rows[-1], flush=True)
    for impl in args.attention:
        r = estimate(args.config, args.batch, "float32", impl, "none", "standin", args.steps, args.block)
        label = f"JAX stand-in, {impl}" + (f" (block {args.block})" if impl == "blockwise" else "")
        rows.append((label, r["fwd_samples_s"], r["train_samples_s"]))
        print(rows[-1], flush=True)
    print(f"\n{args.config} stand-in, batch {args.batch}, float32, {args.steps} steps after warm-up "
          "(shared machine: noisy; compare within this run)\n")
    print("| model | fwd samples/s | train samples/s | train vs PyTorch |")
    print("|---|---:|---:|---:|")
    for label, f, t in rows:
        print(f"| {label} | {f:.3f} | {t:.3f} | {t / rows[0][2]:.2f}x |")


if __name__ == "__main__":
    main()
