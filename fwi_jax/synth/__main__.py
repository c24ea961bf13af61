"""python -m fwi_jax.synth --n N --out DIR [--seed S] [--family F ...] [--mode fast|full] [--cpu-devices K]

On a CPU, XLA runs one model on one core; ``--cpu-devices`` (default: the number of cores) splits
the host into that many JAX devices so models run in parallel (``wave.simulate`` shards the batch
over them). It must be set before JAX starts, hence here and not in ``make_dataset``.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from fwi_jax.synth.geology import FAMILIES

    p = argparse.ArgumentParser(prog="python -m fwi_jax.synth", description="Write synthetic samples in the competition format.")
    p.add_argument("--n", type=int, required=True, help="number of samples (ids 0..n-1 of the seed)")
    p.add_argument("--out", required=True, help="output folder; one sub-folder per sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", action="append", choices=FAMILIES, help=f"repeatable; default all of {FAMILIES}")
    p.add_argument("--mode", default="fast", choices=("fast", "full"))
    p.add_argument("--batch", type=int, default=None, help="models per solver call (default 2 per device)")
    p.add_argument("--cpu-devices", type=int, default=os.cpu_count() or 1, help="JAX host devices (CPU only)")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    flag = "--xla_force_host_platform_device_count"
    if a.cpu_devices > 1 and flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={a.cpu_devices}".strip()
    from fwi_jax.synth import FAMILIES, make_dataset  # jax reads XLA_FLAGS when its backend starts

    families = tuple(a.family) if a.family else FAMILIES
    make_dataset(a.out, a.n, seed=a.seed, families=families, mode=a.mode, progress=not a.no_progress, batch=a.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
