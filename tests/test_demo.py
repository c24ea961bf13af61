"""python -m fwi_jax.demo end to end at a reduced size (16/4/4 synthetic samples, a 2-block
network, 2 epochs, 2 members): synthesis, training, ensemble inference with TTA, baseline, plots;
then scripts/learning_curve.py on the same cached data. They check the plumbing and the outputs,
not the accuracy (docs/learning.md gives the full-size figures). Both take minutes: the full
tier. The fast tier checks the demo's own pieces (its baseline, its summary of a run, its
refusals); synthesis, training and inference have their own fast tests."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


SYNTH_SETS = ["synth.n_train=16", "synth.n_val=4", "synth.n_test=4"]


@pytest.fixture(scope="module")
def synth_cache(tmp_path_factory) -> pathlib.Path:
    """One synthetic cache for the module: the demo test fills it (synthesis is part of what it
    checks); the learning-curve test reuses it, or fills it itself when run alone."""
    return tmp_path_factory.mktemp("synth")


def test_baseline_best_validation_and_refusals(tmp_path, capsys, monkeypatch):
    """The mean-velocity-profile baseline against NumPy on three made-up samples, the best
    validation MAPE read from a run's metrics, and a config the demo cannot run: one error line."""
    from fwi_jax import demo
    from fwi_jax.data.io import VELOCITY_FILE
    from fwi_jax.loss import competition_mape

    rng = np.random.default_rng(0)
    vs = {f"s{k}": rng.uniform(1.5, 4.5, (300, 1259)).astype(np.float32) for k in range(3)}
    for name, v in vs.items():
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / VELOCITY_FILE, v)
    profile = (vs["s0"].mean(axis=0) + vs["s1"].mean(axis=0)) / 2  # (depth,)
    expected = competition_mape(vs["s2"], np.broadcast_to(profile, (300, 1259)))
    got = demo.mean_profile_baseline(tmp_path, ["s0", "s1"], ["s2"])
    assert got == pytest.approx(expected, rel=1e-6)

    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"step": 1, "train/loss": 0.2},
        {"step": 4, "val/mape": 0.07},
        {"step": 8, "val/mape": 0.06},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert demo._best_val(run) == 0.06

    monkeypatch.setattr("fwi_jax.host.tune_cpu_host", lambda: "")  # leave this process untuned
    assert demo.main(["--workdir", str(tmp_path / "d"), "--set", "synth.n_test=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "synth.n_test" in err[0], err


@pytest.mark.full
def test_demo_reduced_end_to_end(tmp_path, synth_cache):
    sets = [
        *SYNTH_SETS,
        f"synth.cache_dir={synth_cache}",
        "train.epochs=2",
        "train.batch_size=4",
        "train.warmup_steps=2",
        "train.ema_start_epoch=1",
        "train.log_every_steps=2",
        "model.dim=64",
        "model.heads=2",
        "model.depth=2",
        "model.split=1",
    ]
    cmd = [
        sys.executable,
        "-m",
        "fwi_jax.demo",
        "--workdir",
        str(tmp_path / "demo"),
        "--members",
        "2",
        "--plots",
        "2",
        "--no-progress",
        *[a for s in sets for a in ("--set", s)],
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "mean-velocity-profile baseline" in proc.stdout
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["members"] == 2 and summary["heldout_samples"] == 4
    assert 0 < summary["heldout_mape"] < 1 and 0 < summary["baseline_mape"] < 1
    assert all(v is not None and 0 < v < 1 for v in summary["member_best_val_mape"])
    sub = np.load(tmp_path / "demo" / "submission.npz")
    assert sorted(sub.files) == [f"synth_s0_{i:06d}" for i in range(20, 24)]
    assert all(sub[k].shape == (300, 1259) and sub[k].dtype == np.float64 for k in sub.files)
    pngs = [tmp_path / "demo" / f"member{k}" / "training_curves.png" for k in range(2)]
    pngs += sorted((tmp_path / "demo" / "submission_plots").glob("*.png"))
    assert len(pngs) == 4
    for p in pngs:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 10_000
    # a rerun finds the data cached and the members trained
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("already trained") == 2 and "synthesising" not in again.stdout


@pytest.mark.full
def test_learning_curve_stops_the_run_after_the_last_mark(tmp_path, synth_cache):
    sets = [
        *SYNTH_SETS,
        f"synth.cache_dir={synth_cache}",
        "train.epochs=1000",
        "train.batch_size=4",
        "train.warmup_steps=2",
        "train.ema_start_epoch=1",
        "train.constant_fraction=1.0",
        "model.dim=64",
        "model.heads=2",
        "model.depth=2",
        "model.split=1",
    ]
    if not any(synth_cache.iterdir()):  # run alone: the demo test has not made the data
        from fwi_jax.config import load_config
        from fwi_jax.train import synthetic_dataset

        synthetic_dataset(load_config("demo", sets))
    work = tmp_path / "curve"
    cmd = [sys.executable, "scripts/learning_curve.py", "--config", "demo", "--workdir", str(work)]
    cmd += ["--minutes", "0.1", "0.25", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "synthesising" not in proc.stdout  # the cached data, before the clock starts
    rows = [ln.split("|") for ln in proc.stdout.splitlines() if ln.startswith("| 0.")]
    assert [r[1].strip() for r in rows] == ["0.1", "0.25"]
    csv = (work / "learning_curve.csv").read_text().splitlines()
    assert csv[0] == "step,sample_steps,epoch,minutes,val_mape" and len(csv) >= 3
    minutes = [float(ln.split(",")[3]) for ln in csv[1:]]
    assert minutes == sorted(minutes) and 0.1 < minutes[-1] < 1.0  # stopped soon after 15 s
    assert (work / "learning_curve.png").read_bytes()[:8] == PNG
    last = max(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert last < 4000  # SIGTERM stopped it long before its 1000 epochs, with a checkpoint
