"""``python -m fwi_jax.demo``: the whole pipeline on a machine with no downloads.

    python -m fwi_jax.demo [--workdir runs/demo] [--members 1] [--set key=value ...]

1. Synthesise the ``demo`` config's dataset (``fwi_jax.synth``; cached under ``synth.cache_dir``):
   ``synth.n_train`` training, ``synth.n_val`` validation and ``synth.n_test`` held-out samples.
2. Train ``--members`` networks of the ``demo`` config (seeds 0, 1, ...; ``python -m
   fwi_jax.train``'s code path). A rerun resumes unfinished members and skips finished ones.
3. Run the ensemble on the held-out split with flip TTA (``python -m fwi_jax.infer``), write the
   submission file and per-sample MAPE.
4. Print the held-out MAPE beside the baseline that knows only the training set's mean velocity
   at each depth (the mean-velocity-profile baseline), and write ``summary.json``.
5. Plots: ``training_curves.png`` per member and truth / prediction / error / shot gathers for a
   few held-out samples (``submission_plots/``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

from fwi_jax import cli
from fwi_jax.config import Config, ConfigError, add_override_argument, load_config


def mean_profile_baseline(
    root: pathlib.Path, train_ids: Sequence[str], test_ids: Sequence[str]
) -> float:
    """Competition MAPE on ``test_ids`` of predicting, for every sample, the training set's mean
    velocity at each depth (constant along x)."""
    from fwi_jax.data.io import VELOCITY_FILE
    from fwi_jax.loss import competition_mape

    load = lambda i: np.load(root / i / VELOCITY_FILE)  # (x, depth) km/s
    profile = np.mean([load(i).mean(axis=0) for i in train_ids], axis=0)  # (depth,)
    scores = []
    for i in test_ids:
        v = load(i)  # read once
        scores.append(competition_mape(v, np.broadcast_to(profile, v.shape)))
    return float(np.mean(scores))


def run(
    cfg: Config, workdir: pathlib.Path, members: int = 1, plots: int = 4, progress: bool = True
) -> dict:
    from fwi_jax import plots as plotting
    from fwi_jax.train import TrainError, resolve_data, train

    t_start = time.perf_counter()
    if cfg.data.root or cfg.synth.n_test <= 0:
        raise TrainError(
            "the demo runs on its own synthetic data: leave data.root empty and set synth.n_test "
            "> 0"
        )
    data = resolve_data(cfg, progress)
    t_data = time.perf_counter() - t_start
    print(
        f"data: {len(data.train_ids)} train / {len(data.val_ids)} validation / "
        f"{len(data.test_ids)} held-out "
        f"synthetic samples in {data.root}",
        flush=True,
    )

    runs = []
    for k in range(members):
        member_cfg = cfg.replace(**{"train.seed": cfg.train.seed + k})
        run_dir = workdir / f"member{k}"
        if (run_dir / "final").is_dir():
            print(f"member {k}: already trained ({run_dir})", flush=True)
        else:
            print(
                f"member {k}: training {cfg.name} (seed {member_cfg.train.seed}) in {run_dir}",
                flush=True,
            )
            train(member_cfg, run_dir, data, resume=True, progress=progress)
        plotting.plot_training_curves(run_dir / "metrics.jsonl", run_dir / "training_curves.png")
        runs.append(run_dir)
    t_train = time.perf_counter() - t_start - t_data

    test_list = workdir / "test_ids.txt"
    test_list.write_text("".join(i + "\n" for i in data.test_ids))
    sub = workdir / "submission.npz"
    # the inference command as a user runs it (its own process, as the simulator's)
    cmd = [
        sys.executable,
        "-m",
        "fwi_jax.infer",
        "--data",
        str(data.root),
        "--list",
        str(test_list),
        "--checkpoints",
        *map(str, runs),
        "--out",
        str(sub),
        "--val",
        "--plot",
        str(plots),
        "--batch",
        str(cfg.train.batch_size),
    ]
    if not progress:
        cmd.append("--no-progress")
    if subprocess.run(cmd).returncode != 0:
        raise TrainError("ensemble inference failed (see the error above)")
    per_sample = np.loadtxt(sub.with_suffix(".csv"), delimiter=",", skiprows=1, usecols=1, ndmin=1)
    summary = {
        "members": members,
        "heldout_samples": len(data.test_ids),
        "heldout_mape": float(per_sample.mean()),
        "baseline_mape": mean_profile_baseline(data.root, data.train_ids, data.test_ids),
        "member_best_val_mape": [_best_val(r) for r in runs],
        "seconds": {
            "data": round(t_data, 1),
            "train": round(t_train, 1),
            "total": round(time.perf_counter() - t_start, 1),
        },
        "submission": str(sub),
        "plots": [str(r / "training_curves.png") for r in runs]
        + [str(sub.with_name(sub.stem + "_plots"))],
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    share = summary["heldout_mape"] / max(summary["baseline_mape"], 1e-12)
    who = "one member" if members == 1 else f"{members}-member ensemble"
    label = f"held-out MAPE, {who} with flip TTA:"
    print(
        f"\n{label} {summary['heldout_mape']:.4f}  ({share:.2f}x the baseline's)\n"
        f"{'mean-velocity-profile baseline:':<{len(label)}} {summary['baseline_mape']:.4f}\n"
        f"plots: {', '.join(summary['plots'])}\nsummary: {workdir / 'summary.json'}",
        flush=True,
    )
    return summary


def _best_val(run_dir: pathlib.Path) -> float | None:
    vals = [
        json.loads(ln).get("val/mape")
        for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
        if ln.strip()
    ]
    vals = [v for v in vals if v is not None]
    return min(vals) if vals else None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fwi_jax.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="demo", help="config name or path (default: demo)")
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument(
        "--members", type=int, default=1, help="ensemble members to train (seeds 0..N-1)"
    )
    ap.add_argument("--plots", type=int, default=4, help="held-out samples to plot")
    add_override_argument(ap)
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from fwi_jax.train import TrainError

    args = build_parser().parse_args(argv)
    from fwi_jax.host import tune_cpu_host

    tune_cpu_host()
    try:
        cfg = load_config(args.config, args.set)
        run(
            cfg,
            pathlib.Path(args.workdir).expanduser().resolve(),
            args.members,
            args.plots,
            not args.no_progress,
        )
    except (TrainError, ConfigError) as e:
        return cli.fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
