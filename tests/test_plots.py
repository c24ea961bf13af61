"""fwi_jax.plots: the sample figure and the training curves are real PNGs with the drawn content."""

import json
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from fwi_jax import plots


def sample(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((6, 10000, 31)).astype(np.float32)
    x[3] = 0.0  # channel 151 is empty
    truth = np.linspace(1.5, 4.5, 1259, dtype=np.float32)[:, None].repeat(300, axis=1)
    return x, truth


def test_sample_figure_with_and_without_truth(tmp_path):
    x, truth = sample()
    pred = truth * 1.05
    with_truth = plots.plot_sample(tmp_path / "a.png", "abc", x, pred, truth)
    no_truth = plots.plot_sample(tmp_path / "b.png", "abc", x, pred)
    a, b = matplotlib.image.imread(with_truth), matplotlib.image.imread(no_truth)
    assert a.shape == b.shape and a.shape[0] > 500 and a.shape[1] > 900
    # the truth and error panels fill the top-right two thirds that stay blank without truth
    h, w = a.shape[:2]
    top_right = (slice(int(0.1 * h), int(0.45 * h)), slice(int(0.42 * w), w))
    assert a[top_right][..., :3].std() > 0.1
    assert b[top_right][..., :3].std() < 0.02


def test_sample_figure_rejects_wrong_shapes(tmp_path):
    x, truth = sample()
    with pytest.raises(ValueError, match="expected \\(6, n_time, n_receivers\\)"):
        plots.plot_sample(tmp_path / "c.png", "abc", x[:5], truth)
    with pytest.raises(ValueError, match="must be equal"):
        plots.plot_sample(tmp_path / "c.png", "abc", x, truth, truth.T)
    assert not (tmp_path / "c.png").exists()


def test_training_curves_from_jsonl(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"step": s, "epoch": s // 10, "train/loss": 1.0 / (s + 1), "lr": 2e-4}
        for s in range(0, 50, 5)
    ]
    lines += [{"step": s, "epoch": s // 10, "val/mape": 0.1 / (s + 1)} for s in range(10, 60, 10)]
    metrics.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    png = plots.plot_training_curves(metrics, tmp_path / "curves.png")
    img = matplotlib.image.imread(png)
    h, w = img.shape[:2]
    # both panels have a drawn line: non-white pixels in each half
    for half in (img[:, : w // 2], img[:, w // 2 :]):
        assert (half[..., :3] < 0.6).mean() > 0.01
    out = subprocess.run(
        [sys.executable, "-m", "fwi_jax.plots", "curves", str(metrics), str(tmp_path / "cli.png")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "cli.png").stat().st_size > 10_000


def test_training_curves_errors_name_the_file(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"step": 1, "lr": 0.1}\n')
    with pytest.raises(ValueError, match="no loss or MAPE"):
        plots.plot_training_curves(bad, tmp_path / "x.png")
    bad.write_text('{"step": 1, "loss": 0.1}\n{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match="m.jsonl:2: not JSON"):
        plots.plot_training_curves(bad, tmp_path / "x.png")


def test_training_curves_add_a_gradient_norm_panel(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"step": s, "train/loss": 1.0 / (s + 1), "train/grad_norm": 10.0**-s} for s in range(1, 30)
    ]
    metrics.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    img = matplotlib.image.imread(plots.plot_training_curves(metrics, tmp_path / "curves.png"))
    w = img.shape[1]
    two_panels = matplotlib.image.imread(
        plots.plot_training_curves(_without_grad(metrics, tmp_path), tmp_path / "c2.png")
    )
    assert w > 1.4 * two_panels.shape[1]
    assert (img[:, 2 * w // 3 :][..., :3] < 0.6).mean() > 0.01  # the third panel has a line


def _without_grad(metrics, tmp_path):
    out = tmp_path / "no_grad.jsonl"
    out.write_text(
        "".join(
            json.dumps({k: v for k, v in json.loads(ln).items() if k != "train/grad_norm"}) + "\n"
            for ln in metrics.read_text().splitlines()
        )
    )
    return out
