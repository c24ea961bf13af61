"""Time every attention implementation at the model's real attention shapes, with PyTorch's
fused F.scaled_dot_product_attention in the same run. Prints a Markdown table.

Shapes (q, k, v: (batch, tokens, heads, head_dim)): the EVA02 blocks see the 6 receiver
channels folded into the batch, so batch = 6 x samples; tokens = 1,980 patches + cls = 1,981.
  tiny: (6 * batch, 1981, 3, 64)     base: (6 * batch, 1981, 12, 64)

    .venv/bin/python scripts/bench_attention.py                 # tiny and base, float32
    .venv/bin/python scripts/bench_attention.py --shapes tiny --dtype bfloat16 --repeats 5

"fwd" is the forward pass alone; "fwd+bwd" is value_and_grad of sum(out * w) w.r.t. q, k, v
(torch: the same with .backward()). Median wall time of --repeats runs after one warm-up
(compilation excluded). Timings on a shared machine are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from fwi_jax.host import tune_cpu_host
from fwi_jax.model.attention import attention, resolve_impl

SHAPES = {"tiny": (6, 1981, 3, 64), "base": (6, 1981, 12, 64)}
# --blocks unset: these per implementation (blockwise: key blocks; the others: query blocks)
DEFAULT_BENCH_BLOCKS = {
    "blockwise": [256, 512, 1024],
    "query_blocks": [256, 512],
    "fused_cpu": [64, 128, 256],
}


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_jax(impl: str, block: int, shape, dtype, repeats: int) -> tuple[float, float]:
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, w = (jax.random.normal(key, shape, dtype) for key in keys)
    attn = lambda q, k, v: attention(q, k, v, impl=impl, block_size=block)
    fwd = jax.jit(attn)
    loss = lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) * w)
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    t_fwd = _median_seconds(lambda: jax.block_until_ready(fwd(q, k, v)), repeats)
    t_bwd = _median_seconds(lambda: jax.block_until_ready(fwd_bwd(q, k, v)), repeats)
    return t_fwd, t_bwd


def bench_torch(shape, dtype: str, repeats: int) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dtype
    ]
    b, n, h, d = shape
    gen = torch.Generator().manual_seed(0)
    # torch's layout is (batch, heads, tokens, head_dim)
    q, k, v, w = (
        torch.randn(b, h, n, d, generator=gen, dtype=torch.float32).to(torch_dtype)
        for _ in range(4)
    )

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)

    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))

    def fwd_bwd():
        for t in (qg, kg, vg):
            t.grad = None
        (F.scaled_dot_product_attention(qg, kg, vg).float() * w.float()).sum().backward()

    return _median_seconds(fwd, repeats), _median_seconds(fwd_bwd, repeats)


def attention_flops(shape, backward: bool) -> float:
    """Matmul FLOPs: forward 2 matmuls of 2*N*N*D per head; backward 2.5x forward (5 matmuls
    for the exact gradient: dV, dP, dQ, dK, plus the recomputed QK^T in blockwise)."""
    b, n, h, d = shape
    forward = 2 * 2 * b * h * n * n * d
    return forward * (3.5 if backward else 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["tiny", "base"], choices=sorted(SHAPES))
    parser.add_argument(
        "--batch", type=int, default=1, help="samples per step (attention batch = 6 x this)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--impls", nargs="+", default=["xla", "blockwise", "query_blocks", "fused_cpu"]
    )
    parser.add_argument(
        "--blocks",
        nargs="+",
        type=int,
        default=None,
        help="block sizes for every tiled implementation (default: DEFAULT_BENCH_BLOCKS)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    tune_cpu_host()  # as training runs

    dtype = jnp.dtype(args.dtype)
    rows = []
    for name in args.shapes:
        b, n, h, d = SHAPES[name]
        shape = (b * args.batch, n, h, d)
        cases = []
        for impl in args.impls:
            blocks = args.blocks or DEFAULT_BENCH_BLOCKS.get(impl, [0])
            if impl in ("blockwise", "query_blocks", "fused_cpu"):
                cases += [(impl, blk) for blk in blocks]
            elif impl == "auto":
                cases.append((f"auto={resolve_impl('auto', head_dim=d)}", None))
            else:
                cases.append((impl, None))
        for label, block in cases:
            impl = label.split("=")[-1]
            t_fwd, t_bwd = bench_jax(impl, block, shape, dtype, args.repeats)
            tag = f"jax {label}" + (
                f" (key block {block})"
                if impl == "blockwise"
                else f" (query block {block})"
                if impl in ("query_blocks", "fused_cpu")
                else ""
            )
            rows.append((name, shape, tag, t_fwd, t_bwd))
            print(
                f"{name} {tag}: fwd {t_fwd * 1e3:.0f} ms, fwd+bwd {t_bwd * 1e3:.0f} ms", flush=True
            )
        if not args.no_torch:
            t_fwd, t_bwd = bench_torch(shape, args.dtype, args.repeats)
            rows.append((name, shape, "torch F.scaled_dot_product_attention", t_fwd, t_bwd))
            print(
                f"{name} torch sdpa: fwd {t_fwd * 1e3:.0f} ms, fwd+bwd {t_bwd * 1e3:.0f} ms",
                flush=True,
            )

    print(
        f"\nAttention, {args.dtype}, {jax.devices()[0].device_kind}, median of {args.repeats} "
        f"(shared machine: noisy)\n"
    )
    print(
        "| shape (B, N, H, D) | implementation | fwd ms | fwd GFLOP/s | fwd+bwd ms | fwd+bwd "
        "GFLOP/s |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name, shape, tag, t_fwd, t_bwd in rows:
        print(
            f"| {name} {shape} | {tag} | {t_fwd * 1e3:.0f} | "
            f"{attention_flops(shape, False) / t_fwd / 1e9:.0f} "
            f"| {t_bwd * 1e3:.0f} | {attention_flops(shape, True) / t_bwd / 1e9:.0f} |"
        )


if __name__ == "__main__":
    main()
