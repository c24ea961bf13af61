"""Command line: ``python -m fwi_jax.data {check,split,pack} ...``.

check DIR [--list F]: validate every sample, print each bad one, exit 1 if any.
split --first DIR_OR_LIST --extra DIR_OR_LIST --out OUTDIR: the reference split (reference §1),
written as OUTDIR/train_f0.txt and OUTDIR/val_f0.txt, one id per line.
pack SRC OUT [--list F] [--float16]: validate every sample and write the packed store OUT
(x.npy, v.npy, ids.txt, index.json; see fwi_jax.data.pack), atomically.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from fwi_jax import cli
from fwi_jax.config import CHOICES
from fwi_jax.data import io, split


def _ids_of(source: str) -> list[str]:
    """Ids of a dataset folder (its sub-folders) or of an id-list text file."""
    p = pathlib.Path(source).expanduser()
    if p.is_dir():
        return io.list_samples(p)
    if p.is_file():
        return split.read_id_list(p)
    raise FileNotFoundError(f"{p}: neither a dataset folder nor an id list")


def _add_v_range(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--v-range",
        type=float,
        nargs=2,
        default=(0.5, 10.0),
        metavar=("LO", "HI"),
        help="allowed velocities in km/s (default 0.5 10)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fwi_jax.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate every sample of a dataset folder")
    c.add_argument("root")
    c.add_argument(
        "--list", default=None, help="text file of ids to check (default: every sub-folder)"
    )
    _add_v_range(c)
    c.add_argument("--require-velocity", action="store_true", help="vp_model.npy must be present")
    c.add_argument("--no-progress", action="store_true")
    s = sub.add_parser("split", help="reference 5-fold split, fold 0 as validation")
    s.add_argument("--first", required=True, help="first release: dataset folder or id list")
    s.add_argument(
        "--extra", default=None, help="extended release (all to training): folder or id list"
    )
    s.add_argument("--out", required=True, help="output folder for train_f0.txt / val_f0.txt")
    k = sub.add_parser(
        "pack", help="pack a dataset folder into memory-mapped arrays (fast loading)"
    )
    k.add_argument("src")
    k.add_argument("out")
    k.add_argument(
        "--list", default=None, help="text file of ids to pack (default: every sub-folder)"
    )
    k.add_argument(
        "--float16", action="store_true", help="store x as float16 (half the size, rounded)"
    )
    _add_v_range(k)
    k.add_argument(
        "--time-resample",
        choices=CHOICES["geometry.time_resample"],
        default="drop_last",
        help="10001 -> 10000 time samples: drop the last (default) or area-resample (the first "
        "place's input; the config's geometry.time_resample must match)",
    )
    k.add_argument("--no-progress", action="store_true")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    try:
        if args.cmd == "check":
            ids = io.list_samples(pathlib.Path(args.root).expanduser(), args.list)
            bad = io.check_dataset(
                pathlib.Path(args.root).expanduser(),
                ids,
                v_range=tuple(args.v_range),
                require_velocity=args.require_velocity or None,
                progress=not args.no_progress,
            )
            for sample_id, message in bad:
                print(f"BAD {sample_id}: {message}")
            print(f"{len(ids) - len(bad)} of {len(ids)} samples good, {len(bad)} bad")
            return 1 if bad else 0
        if args.cmd == "pack":
            from fwi_jax.data import pack

            src = pathlib.Path(args.src).expanduser()
            index = pack.pack(
                src,
                args.out,
                io.list_samples(src, args.list),
                dtype="float16" if args.float16 else "float32",
                v_range=tuple(args.v_range),
                progress=not args.no_progress,
                time_resample=args.time_resample,
            )
            print(
                f"packed {index['n']} samples into {pathlib.Path(args.out).expanduser()} (x "
                f"{index['dtype']}, "
                f"{'with' if index['has_velocity'] else 'without'} velocities)"
            )
            return 0
        first = _ids_of(args.first)
        extra = _ids_of(args.extra) if args.extra else []
        train, val = split.reference_split(first, extra)
        out = pathlib.Path(args.out).expanduser()
        split.write_id_list(out / "train_f0.txt", train)
        split.write_id_list(out / "val_f0.txt", val)
        print(
            f"wrote {out / 'train_f0.txt'} ({len(train)} ids) and {out / 'val_f0.txt'} "
            f"({len(val)} ids)"
        )
        return 0
    except (ValueError, OSError) as e:
        return cli.fail(e)


if __name__ == "__main__":
    sys.exit(main())
