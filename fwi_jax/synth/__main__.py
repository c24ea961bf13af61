"""Synthetic data in the competition format.

    python -m fwi_jax.synth --n N --out DIR [--profile cpml8|devito] [--mode fast|full]
        [--seed S] [--family F ...] [--cpu-devices K]
    python -m fwi_jax.synth calibrate --data DIR [--samples K] [--profile devito] [--out FILE]
    python -m fwi_jax.synth --mix-from DIR --n N --out OUT [--calibration FILE]
        [--family F ... --geology-share P]

The first draws geology models; ``calibrate`` fits a profile's polarity, amplitude and time
shift to a dataset and writes DIR/synth_calibration.json; ``--mix-from`` makes training-only
samples from pairs of DIR's velocity models with that calibration (fwi_jax.synth.mix).

On a CPU, XLA runs one model on one core; ``--cpu-devices`` (default: the number of cores) splits
the host into that many JAX devices so models run in parallel (``wave.simulate`` shards the batch
over them). It must be set before JAX starts, hence here and not in ``make_dataset``.
"""

from __future__ import annotations

import argparse
import os
import sys

PROFILES = ("cpml8", "devito")  # fwi_jax.synth.profiles.PROFILES (not imported: JAX starts later)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cpu-devices", type=int, default=os.cpu_count() or 1, help="JAX host devices (CPU only)"
    )
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    from fwi_jax.synth.geology import FAMILIES

    p = argparse.ArgumentParser(
        prog="python -m fwi_jax.synth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, help="number of samples (ids 0..n-1 of the seed); required")
    p.add_argument("--out", help="output folder; one sub-folder per sample; required")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--family", action="append", choices=FAMILIES, help=f"repeatable; default all of {FAMILIES}"
    )
    p.add_argument(
        "--profile",
        default="cpml8",
        choices=PROFILES,
        help="generator profile (default cpml8; devito: the devito recipe)",
    )
    p.add_argument("--mode", default="fast", choices=("fast", "full"), help="cpml8 solver mode")
    p.add_argument(
        "--mix-from",
        default=None,
        metavar="DIR",
        help="mix pairs of DIR's velocity models (needs DIR's calibration)",
    )
    p.add_argument(
        "--calibration",
        default=None,
        metavar="FILE",
        help="calibration file for --mix-from (default DIR/synth_calibration.json)",
    )
    p.add_argument(
        "--geology-share",
        type=float,
        default=0.0,
        metavar="P",
        help="--mix-from: share of mixes whose second model is a geology family model "
        "(with --family)",
    )
    p.add_argument(
        "--batch", type=int, default=None, help="models per solver call (default 2 per device)"
    )
    _common(p)
    sub = p.add_subparsers(dest="cmd", required=False, metavar="calibrate")
    add_calibrate_parser(sub)
    return p


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit a profile's polarity, amplitude, time shift to data",
        description="Fit a generator profile's polarity, amplitude and time shift "
        "to a dataset and write DIR/synth_calibration.json.",
    )
    p.add_argument(
        "--data", required=True, help="dataset folder (sample folders with vp_model.npy)"
    )
    p.add_argument("--samples", type=int, default=3, help="samples re-simulated (default 3)")
    p.add_argument("--profile", default="devito", choices=PROFILES)
    p.add_argument(
        "--mode",
        default="fast",
        choices=("fast", "full"),
        help="solver mode: cpml8's grid (4 m | 1 m); devito: the grid the misfit and refinement "
        "run on (6 m | 2 m; the fit itself uses the profile's 2 m grid)",
    )
    p.add_argument(
        "--out", default=None, help="calibration file (default DIR/synth_calibration.json)"
    )
    p.add_argument("--min-correlation", type=float, default=0.95)
    _common(p)


def parse(argv=None):
    return build_parser().parse_args(argv)


def _set_devices(n: int) -> None:
    flag = "--xla_force_host_platform_device_count"
    if n > 1 and flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={n}".strip()


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    calibrate = a.cmd == "calibrate"
    if not calibrate and (a.n is None or a.out is None):
        parser.error("--n and --out are required (or the calibrate command)")
    _set_devices(a.cpu_devices)  # jax reads XLA_FLAGS when its backend starts
    from fwi_jax import cli
    from fwi_jax.synth import FAMILIES, make_dataset
    from fwi_jax.synth.calibrate import CalibrationError

    try:
        if calibrate:
            from fwi_jax.synth.calibrate import calibrate as run

            run(
                a.data,
                samples=a.samples,
                profile=a.profile,
                mode=a.mode,
                out=a.out,
                min_correlation=a.min_correlation,
                progress=not a.no_progress,
            )
            return 0
        if a.mix_from:
            from fwi_jax.synth.mix import make_mixed

            make_mixed(
                a.mix_from,
                a.out,
                a.n,
                seed=a.seed,
                calibration=a.calibration,
                families=tuple(a.family or ()),
                geology_share=a.geology_share,
                progress=not a.no_progress,
                batch=a.batch,
            )
            return 0
        families = tuple(a.family) if a.family else FAMILIES
        make_dataset(
            a.out,
            a.n,
            seed=a.seed,
            families=families,
            mode=a.mode,
            profile=a.profile,
            progress=not a.no_progress,
            batch=a.batch,
        )
        return 0
    except (CalibrationError, ValueError, OSError) as e:
        return cli.fail(e)


if __name__ == "__main__":
    sys.exit(main())
