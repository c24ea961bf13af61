"""``python -m fwi_jax.refine``: full-waveform refinement of a submission's velocity models.

    python -m fwi_jax.refine --data DIR --pred SUB.npz --out REFINED.npz [--list ids.txt]
        [--calibration FILE] [--mode fast|full] [--stages full:20] [--method lbfgs|momentum]
        [--lr 0.02] [--tv 0.05] [--depth-power 1] [--gradient adjoint|autodiff]
        [--v-range 1.5 4.5] [--undershoot 0.2] [--t-max 1.0] [--batch 1] [--csv FILE] [--plot K]

Each prediction is the start of an inversion against the shot gathers of its sample folder
(``fwi_jax.physics.refine``: the gradient through the calibrated solver, L-BFGS steps, a
total-variation term, the result kept in --v-range). Writes the refined models as a normal
submission (``fwi_jax.data.io.write_submission``) and a CSV with, per sample, the misfit before
and after, which model was kept, and the MAPE before and after where ``vp_model.npy`` exists.

Which physics for which data (the calibration file says; DATA/synth_calibration.json by default):
  data made by devito (the challenge's, or python -m fwi_jax.synth --profile devito):
      python -m fwi_jax.synth calibrate --data DATA --profile devito, then refine: the devito
      profile's damping layer, wavelet and clock on a 6 m 4th-order grid (--mode full: its own
      2 m grid, much slower: see docs/physics.md);
  data made by python -m fwi_jax.synth (cpml8): no calibration file needed, the cpml8 solver on
      its 4 m grid (--mode full: 1 m). With no modelling error, low-pass stages gain more there:
      --method momentum --stages 6:6,10:6,full:8 --undershoot 0 (docs/physics.md).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from fwi_jax import cli
from fwi_jax.data import io
from fwi_jax.physics import (
    DEFAULT_STAGES,
    V_RANGE,
    PhysicsError,
    RefineConfig,
    add_forward_args,
    data_folder,
    load_forward,
    parse_stages,
    read_observed,
    refine,
    write_csv,
)


def _stages_text(stages) -> str:
    return ",".join(f"{'full' if c is None else f'{c:g}'}:{n}" for c, n in stages)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fwi_jax.refine",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:]),
    )
    ap.add_argument("--data", required=True, help="folder of sample folders (competition format)")
    ap.add_argument("--pred", required=True, help="submission .npz to start from")
    ap.add_argument("--out", required=True, help="refined submission .npz to write")
    ap.add_argument("--list", help="text file of sample ids to refine (default: every prediction)")
    add_forward_args(ap)
    ap.add_argument(
        "--stages",
        default=_stages_text(DEFAULT_STAGES),
        help="low-pass cutoff (Hz, or full) and iterations per stage (default %(default)s)",
    )
    ap.add_argument(
        "--lr", type=float, default=0.02, help="largest velocity step, km/s (default 0.02)"
    )
    ap.add_argument("--tv", type=float, default=0.05, help="total-variation weight (default 0.05)")
    ap.add_argument(
        "--depth-power",
        type=float,
        default=1.0,
        help="gradient times (depth cell + 1)^P before the step (default 1)",
    )
    ap.add_argument(
        "--method",
        choices=("lbfgs", "momentum"),
        default=RefineConfig.method,
        help=f"step direction: L-BFGS from the stage's last {RefineConfig.memory} steps "
        f"(optax.scale_by_lbfgs), or the gradient with momentum {RefineConfig.momentum} "
        "(default %(default)s)",
    )
    ap.add_argument(
        "--gradient",
        choices=("adjoint", "autodiff"),
        default="adjoint",
        help="adjoint-state (default) or jax.grad through the time loop (5.8x slower on a CPU)",
    )
    ap.add_argument(
        "--v-range",
        type=float,
        nargs=2,
        default=V_RANGE,
        metavar=("LO", "HI"),
        help="velocity bounds of the result, km/s (default 1.5 4.5)",
    )
    ap.add_argument(
        "--undershoot",
        type=float,
        default=RefineConfig.undershoot,
        help="km/s that iterates may go below the --v-range low bound before the result is "
        "clipped to it (default %(default)s)",
    )
    ap.add_argument("--batch", type=int, default=1, help="samples refined together (vmapped)")
    ap.add_argument("--csv", help="per-sample CSV (default: OUT with .csv)")
    ap.add_argument(
        "--plot", type=int, default=0, metavar="K", help="save figures of the first K samples"
    )
    ap.add_argument(
        "--plot-dir", help="folder for --plot figures (default: OUT without suffix + '_plots')"
    )
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm.auto import tqdm

    from fwi_jax.loss import competition_mape

    try:
        root = data_folder(args.data)
        out = pathlib.Path(args.out).expanduser()
        if out.suffix != ".npz":
            raise PhysicsError(f"--out {out}: the submission must be a .npz file")
        if not out.parent.is_dir():
            raise PhysicsError(f"--out {out}: folder {out.parent} does not exist")
        if args.batch < 1:
            raise PhysicsError(f"--batch {args.batch}: must be at least 1")
        cfg = RefineConfig(
            stages=parse_stages(args.stages),
            lr=args.lr,
            tv=args.tv,
            v_range=tuple(args.v_range),
            undershoot=args.undershoot,
            depth_power=args.depth_power,
            gradient=args.gradient,
            method=args.method,
        ).check()
        forward, what = load_forward(root, args.calibration, mode=args.mode, t_max=args.t_max)
        preds = io.read_submission(args.pred)
        ids = sorted(preds)
        if args.list:
            from fwi_jax.data.split import read_id_list

            try:
                ids = sorted(read_id_list(args.list))
            except (OSError, ValueError) as e:
                raise PhysicsError(f"--list {e}") from None
            missing = [i for i in ids if i not in preds]
            if missing:
                raise PhysicsError(
                    f"--list {args.list}: {len(missing)} id(s) not in {args.pred}, e.g. "
                    f"{missing[:3]}"
                )
        if not ids:
            raise PhysicsError(f"--pred {args.pred}: no predictions")
        # every file checked before compute
        observed = {sid: read_observed(root / sid) for sid in ids}
    except (PhysicsError, io.DataError) as e:
        return cli.fail(e)
    n_iter = sum(n for _, n in cfg.stages)
    print(
        f"{what}; {len(ids)} samples, stages {args.stages}, t_max {forward.t_max} s, "
        f"{forward.mode.dx:g} m grid"
    )
    refined, rows = dict(preds), {}
    t0 = time.perf_counter()
    with tqdm(total=len(ids) * n_iter, desc="refine", unit="iter", disable=args.no_progress) as bar:
        for start in range(0, len(ids), args.batch):
            chunk = ids[start : start + args.batch]
            v0 = np.stack([preds[s] for s in chunk])
            res = refine(
                forward, v0, np.stack([observed[s] for s in chunk]), cfg, progress=bar.update
            )
            for k, sid in enumerate(chunk):
                refined[sid] = res.velocity[k]
                row = {
                    "misfit_before": res.misfit_before[k],
                    "misfit_after": res.misfit_after[k],
                    "kept": res.kept[k],
                }
                vfile = root / sid / io.VELOCITY_FILE
                if vfile.is_file():
                    truth = io._load_array(vfile, io.VELOCITY_FILE_SHAPE)
                    row["mape_before"] = competition_mape(truth, v0[k])
                    row["mape_after"] = competition_mape(truth, res.velocity[k])
                rows[sid] = row
            bar.set_postfix(misfit=f"{np.mean(res.misfit_after):.4f}")
    seconds = time.perf_counter() - t0
    io.write_submission(out, refined)
    csv = pathlib.Path(args.csv).expanduser() if args.csv else out.with_suffix(".csv")
    write_csv(csv, rows)
    mb = np.mean([r["misfit_before"] for r in rows.values()])
    ma = np.mean([r["misfit_after"] for r in rows.values()])
    print(
        f"refined {len(rows)} samples in {seconds:.1f} s ({seconds / len(rows):.1f} s per sample, "
        f"compile included): mean misfit {mb:.5f} -> {ma:.5f}"
    )
    if all("mape_before" in r for r in rows.values()):
        print(
            f"mean MAPE {np.mean([r['mape_before'] for r in rows.values()]):.5f} -> "
            f"{np.mean([r['mape_after'] for r in rows.values()]):.5f}"
        )
    print(f"wrote {out} and {csv}")
    if args.plot:
        from fwi_jax import plots

        plot_dir = plots.plot_folder(args.plot_dir, out)
        for sid in ids[: args.plot]:
            x, v = io.read_sample(root / sid)
            plots.plot_sample(plot_dir / f"{sid}.png", sid, x, refined[sid].T, v)
        print(f"wrote {min(args.plot, len(ids))} figures to {plot_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
