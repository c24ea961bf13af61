"""python -m fwi_jax.synth --n N --out DIR [--seed S] [--family F ...] [--mode fast|full]"""

from __future__ import annotations

import argparse
import sys

from fwi_jax.synth import FAMILIES, MODES, make_dataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fwi_jax.synth", description=__doc__ and make_dataset.__doc__)
    p.add_argument("--n", type=int, required=True, help="number of samples (ids 0..n-1 of the seed)")
    p.add_argument("--out", required=True, help="output folder; one sub-folder per sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", action="append", choices=FAMILIES, help=f"repeatable; default all of {FAMILIES}")
    p.add_argument("--mode", default="fast", choices=tuple(MODES))
    p.add_argument("--batch", type=int, default=None, help="models per solver call (default 2 per device)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    families = tuple(a.family) if a.family else FAMILIES
    make_dataset(a.out, a.n, seed=a.seed, families=families, mode=a.mode, progress=not a.no_progress, batch=a.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
