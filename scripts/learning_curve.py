"""Held-out MAPE against training time and sample-steps for one member of a config, on this machine.

    .venv/bin/python scripts/learning_curve.py [--config demo_hour] [--minutes 10 20 40 80]
        [--workdir runs/learning_curve] [--set train.epochs=200 ...]

One run of ``python -m fwi_jax.train`` (its own process, validation after every epoch) on the
config's data, stopped with SIGTERM (the train loop's preemption path: the step finishes and a
checkpoint is saved) once its ``metrics.jsonl`` passes the last mark. For each mark the script
reports the validation MAPE of the last epoch that ended before it (the EMA weights once the EMA
has started), the sample-steps (steps x batch) and the epochs by then, beside the
mean-velocity-profile baseline on the same validation samples (`fwi_jax.demo`). Minutes count
from the start of training (compilation and validation included; data synthesis, done first and
cached, excluded).

A point before the end of a run equals a run of that length only when the run's learning rate does
not depend on its length: ``train.constant_fraction=1.0`` (warmup, then constant). With a decay the
script says so and the earlier points are mid-schedule.

Writes ``learning_curve.csv`` (every validation), ``learning_curve.png`` (MAPE against minutes and
against sample-steps, baseline and marks drawn) and prints a Markdown table of the marks.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def read_vals(metrics: pathlib.Path, batch: int) -> list[dict]:
    """Validation records of a run's metrics.jsonl: step, sample_steps, epoch, minutes, val_mape."""
    from fwi_jax.plots import read_metrics

    return [
        {
            "step": r["step"],
            "sample_steps": r["step"] * batch,
            "epoch": r["epoch"],
            "minutes": r["wall_s"] / 60,
            "val_mape": r["val/mape"],
        }
        for r in (read_metrics(metrics) if metrics.exists() else [])
        if "val/mape" in r
    ]


def last_wall_s(metrics: pathlib.Path) -> float:
    """wall_s of the newest complete record (0 before any); a half-written line is skipped."""
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    for line in reversed(lines):
        try:
            return json.loads(line).get("wall_s", 0.0)
        except json.JSONDecodeError:
            continue
    return 0.0


def at_marks(vals: list[dict], marks: list[float]) -> list[dict | None]:
    """For each mark (minutes) the last validation at or before it (None: none yet)."""
    return [
        max((v for v in vals if v["minutes"] <= m), key=lambda v: v["minutes"], default=None)
        for m in marks
    ]


def plot(vals: list[dict], marks: list[float], baseline: float, title: str, out: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, key, label in (
        (axes[0], "minutes", "training time (min, this machine)"),
        (axes[1], "sample_steps", "sample-steps (steps x batch)"),
    ):
        ax.plot([v[key] for v in vals], [v["val_mape"] for v in vals], "o-", ms=3, label="member")
        ax.axhline(baseline, color="gray", ls="--", label=f"mean-profile baseline {baseline:.4f}")
        ax.axhline(0.7 * baseline, color="gray", ls=":", label="0.7 x baseline")
        ax.axhline(0.5 * baseline, color="gray", ls="-.", label="0.5 x baseline")
        if key == "minutes":
            for m in marks:
                ax.axvline(m, color="k", lw=0.5, alpha=0.4)
        ax.set_xlabel(label)
        ax.set_ylabel("validation MAPE")
        ax.set_ylim(0, max(1.6 * baseline, min(0.3, max(v["val_mape"] for v in vals))))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="demo_hour")
    ap.add_argument("--minutes", type=float, nargs="+", default=[10, 20, 40, 80])
    ap.add_argument("--workdir", default="runs/learning_curve")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    from fwi_jax.config import load_config
    from fwi_jax.demo import mean_profile_baseline
    from fwi_jax.train import synthetic_dataset

    cfg = load_config(a.config, a.set)
    work = pathlib.Path(a.workdir).expanduser().resolve()
    marks = sorted(a.minutes)
    if cfg.train.constant_fraction < 1.0:
        print(
            f"note: train.constant_fraction={cfg.train.constant_fraction}: the learning rate "
            "decays over the run, so the points before its end are mid-schedule, not runs of "
            "that length",
            flush=True,
        )
    if cfg.data.root:
        sys.exit("error: the learning curve runs on the config's synthetic data (data.root empty)")
    data = synthetic_dataset(cfg)  # made and cached before the clock starts
    baseline = mean_profile_baseline(data.root, data.train_ids, data.val_ids)
    cmd = [
        sys.executable,
        "-m",
        "fwi_jax.train",
        "--config",
        a.config,
        "--workdir",
        str(work),
        "--no-progress",
        "--seed",
        str(a.seed),
    ]
    cmd += [x for kv in a.set for x in ("--set", kv)]
    metrics = work / "metrics.jsonl"
    if metrics.exists():
        sys.exit(f"error: {work} already holds a run; choose another --workdir")
    print(" ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd)
    stopped = False
    while proc.poll() is None:
        time.sleep(5)
        if not stopped and last_wall_s(metrics) >= 60 * marks[-1]:
            proc.send_signal(signal.SIGTERM)  # finishes the step, saves, exits 143
            stopped = True
    if proc.returncode not in (0, 143):
        sys.exit(f"error: training exited with {proc.returncode}")

    vals = read_vals(metrics, cfg.train.batch_size)
    if not vals:
        sys.exit(f"error: {metrics} holds no validation")
    with (work / "learning_curve.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(vals[0]))
        w.writeheader()
        w.writerows(vals)
    title = (
        f"{cfg.name}: one member, {len(data.train_ids)} training samples, "
        f"validation on {len(data.val_ids)}"
    )
    plot(vals, marks, baseline, title, work / "learning_curve.png")
    print(f"\n{title}; mean-velocity-profile baseline {baseline:.4f}\n")
    print("| minutes | epochs | sample-steps | validation MAPE | / baseline |")
    print("|---|---|---|---|---|")
    for m, v in zip(marks, at_marks(vals, marks)):
        if v is None:
            print(f"| {m:g} | - | - | (no validation yet) | |")
        else:
            print(
                f"| {m:g} | {v['epoch']:g} | {v['sample_steps']:,} | {v['val_mape']:.4f} | "
                f"{v['val_mape'] / baseline:.2f} |"
            )
    print(f"\n{work / 'learning_curve.csv'}\n{work / 'learning_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
