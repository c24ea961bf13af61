"""PNG figures (matplotlib, Agg backend: no display needed).

- ``plot_sample``: one sample's true velocity, predicted velocity, relative error, the confidence
  map (``--uncertainty``) and its five shot gathers (the figure ``python -m fwi_jax.infer --plot
  K`` writes);
- ``plot_training_curves``: training loss and validation MAPE from a run's JSONL metrics.

CLI: ``python -m fwi_jax.plots curves RUN/metrics.jsonl curves.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from typing import Any

import numpy as np

from fwi_jax import cli
from fwi_jax.preprocess import CHANNEL_POSITIONS, ZERO_CHANNEL

DX_M = 1.0  # m per velocity-model cell in x and depth (reference §6)
DT_S = 1e-4  # s per time sample of a shot gather (10,001 samples over 1 s)
# gathers are drawn times (t / t_max)^2, so late reflections show beside the direct wave
GATHER_GAIN_POWER = 2.0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_folder(plot_dir: str | None, out: pathlib.Path) -> pathlib.Path:
    """The folder, created, for a command's ``--plot`` figures: ``plot_dir`` when given, else the
    output file ``out`` without its suffix + ``_plots``."""
    folder = pathlib.Path(plot_dir).expanduser() if plot_dir else out.with_name(out.stem + "_plots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def plot_sample(
    out_png: str | pathlib.Path,
    sample_id: str,
    x: np.ndarray,
    pred: np.ndarray,
    truth: np.ndarray | None = None,
    confidence: np.ndarray | None = None,
) -> pathlib.Path:
    """Figure of one sample.

    x: model input (6, n_time, n_receivers) (reference §2 steps 1-3; channel 151 is the empty one
    and is not drawn; float16 from a float16 packed store is fine); pred, truth: velocity
    (depth, x) km/s. Without ``truth`` only the prediction is shown. ``confidence``: the
    uncertainty map (depth, x) (`fwi_jax.uncertainty`, an expected relative error), on its own
    colour scale (0 to its 99.5th percentile). Returns the PNG path."""
    plt = _pyplot()
    x, pred = np.asarray(x, dtype=np.float32), np.asarray(pred)
    if x.ndim != 3 or x.shape[0] != len(CHANNEL_POSITIONS):
        raise ValueError(
            f"plot_sample: x has shape {x.shape}, expected ({len(CHANNEL_POSITIONS)}, n_time, "
            "n_receivers)"
        )
    if pred.ndim != 2 or any(
        a is not None and np.shape(a) != pred.shape for a in (truth, confidence)
    ):
        raise ValueError(
            f"plot_sample: prediction {pred.shape}, truth {np.shape(truth)} and confidence "
            f"{np.shape(confidence)} must be equal 2-D (depth, x)"
        )
    shots = [c for c in range(x.shape[0]) if c != ZERO_CHANNEL]
    fig = plt.figure(figsize=(15 if confidence is None else 19, 9), constrained_layout=True)
    sub = fig.subfigures(2, 1, height_ratios=[1.15, 1])
    top = sub[0].subplots(1, 3 if confidence is None else 4)
    depth, width = pred.shape
    extent = (0, width * DX_M / 1e3, depth * DX_M / 1e3, 0)  # km
    if truth is not None:
        truth = np.asarray(truth)
        lo, hi = float(min(truth.min(), pred.min())), float(max(truth.max(), pred.max()))
        rel = np.abs(pred - truth) / (truth + 1e-8)
        panels = [
            (truth, "true velocity (km/s)", "viridis", (lo, hi)),
            (pred, "predicted velocity (km/s)", "viridis", (lo, hi)),
            (
                rel,
                f"relative error |pred - true| / true, MAPE {rel.mean():.4f}",
                "magma",
                (0.0, float(np.percentile(rel, 99.5)) or 1e-6),
            ),
        ]
    else:
        lo, hi = float(pred.min()), float(pred.max())
        panels = [(pred, "predicted velocity (km/s)", "viridis", (lo, hi))]
    if confidence is not None:
        conf = np.asarray(confidence, np.float32)
        panels.append(
            (
                conf,
                f"uncertainty (expected relative error), score {conf.mean(dtype=np.float64):.4f}",
                "magma",
                (0.0, float(np.percentile(conf, 99.5)) or 1e-6),
            )
        )
    for ax in top[len(panels) :]:
        ax.set_axis_off()
    for ax, (img, title, cmap, (vmin, vmax)) in zip(top, panels):
        im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, extent=extent, aspect="auto")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("x (km)")
        ax.set_ylabel("depth (km)")
        fig.colorbar(im, ax=ax, shrink=0.85)
    bottom = sub[1].subplots(1, len(shots), sharey=True)
    n_time = x.shape[1]
    gain = (np.arange(n_time, dtype=np.float32)[:, None] / n_time) ** GATHER_GAIN_POWER
    gathers = x[shots] * gain
    clip = float(np.percentile(np.abs(gathers), 99)) or 1.0
    for ax, c, g in zip(bottom, shots, gathers):
        ax.imshow(
            g,
            cmap="seismic",
            vmin=-clip,
            vmax=clip,
            aspect="auto",
            interpolation="nearest",
            extent=(0.5, x.shape[2] + 0.5, n_time * DT_S, 0),
        )
        ax.set_title(f"shot src_{CHANNEL_POSITIONS[c]}, t\u00b2 gain", fontsize=10)
        ax.set_xlabel("receiver")
    bottom[0].set_ylabel("time (s)")
    fig.suptitle(f"sample {sample_id}", fontsize=12)
    out_png = pathlib.Path(out_png)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


def read_metrics(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """JSONL metrics (one JSON object per line) -> list of dicts; names the line that fails."""
    path = pathlib.Path(path)
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _series(records: list[dict[str, Any]], key: str, axis: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for i, rec in enumerate(records):
        value = rec.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(rec.get(axis, i))
            ys.append(value)
    return np.asarray(xs, np.float64), np.asarray(ys, np.float64)


def plot_training_curves(
    metrics_jsonl_path: str | pathlib.Path, out_png: str | pathlib.Path
) -> pathlib.Path:
    """Loss (every numeric key containing "loss") and MAPE (keys containing "mape") against "step"
    (or "epoch" where a record has no step) from a run's JSONL metrics, log-scale y; a third panel
    with the gradient norm (keys containing "grad_norm") when the run logged it, where a stalled
    run (vanished gradients) shows at a glance."""
    plt = _pyplot()
    records = read_metrics(metrics_jsonl_path)
    keys = sorted(
        {
            k
            for r in records
            for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    )
    loss_keys = [k for k in keys if "loss" in k.lower() and "scale" not in k.lower()]
    mape_keys = [k for k in keys if "mape" in k.lower()]
    if not loss_keys and not mape_keys:
        raise ValueError(f"{metrics_jsonl_path}: no loss or MAPE values among keys {keys}")
    grad_keys = [k for k in keys if "grad_norm" in k.lower()]
    axis = "step" if any("step" in r for r in records) else "epoch"
    panels = [(loss_keys, "training loss"), (mape_keys, "validation MAPE")]
    if grad_keys:
        panels.append((grad_keys, "gradient norm"))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6 * len(panels), 4.5), constrained_layout=True
    )
    for ax, (group, title) in zip(axes, panels):
        drawn = False
        for key in group:
            xs, ys = _series(records, key, axis)
            if len(xs):
                ax.plot(xs, ys, marker="o" if len(xs) < 60 else None, ms=3, label=key)
                drawn = True
        if drawn:
            if all(
                _series(records, k, axis)[1].min() > 0
                for k in group
                if len(_series(records, k, axis)[1])
            ):
                ax.set_yscale("log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(axis)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.suptitle(str(metrics_jsonl_path), fontsize=9)
    out_png = pathlib.Path(out_png)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fwi_jax.plots", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    curves = sub.add_parser("curves", help="training loss and validation MAPE from metrics.jsonl")
    curves.add_argument("metrics")
    curves.add_argument("out_png")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = plot_training_curves(args.metrics, args.out_png)
    except (OSError, ValueError) as e:
        return cli.fail(e)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
