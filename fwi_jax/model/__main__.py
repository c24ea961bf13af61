"""``python -m fwi_jax.model --config NAME``: one jitted forward pass on random input; prints the
output shape and the compile and run times."""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from fwi_jax import cli
from fwi_jax.config import ConfigError, add_override_argument, load_config
from fwi_jax.model import apply_model, count_params, create_model


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fwi_jax.model", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny_s8")
    ap.add_argument("--batch", type=int, default=1)
    add_override_argument(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        return cli.fail(e)
    graphdef, params = create_model(cfg)
    g = cfg.geometry
    x = (
        np.random.default_rng(0)
        .standard_normal((args.batch, 6, g.n_time, g.n_receivers))
        .astype(np.float32)
    )
    forward = jax.jit(lambda p, a: apply_model(graphdef, p, a))
    t0 = time.perf_counter()
    compiled = forward.lower(params, x).compile()
    t1 = time.perf_counter()
    y = compiled(params, x).block_until_ready()
    t2 = time.perf_counter()
    print(
        f"config {cfg.name}: {count_params(params):,} parameters, {cfg.model.dtype}, attention "
        f"{cfg.model.attention}, "
        f"device {jax.devices()[0].platform}"
    )
    print(
        f"input {x.shape} -> velocity {y.shape} km/s in [{float(y.min()):.3f}, "
        f"{float(y.max()):.3f}]"
    )
    print(
        f"compile {t1 - t0:.1f} s, forward {t2 - t1:.2f} s ({args.batch / (t2 - t1):.2f} samples/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
