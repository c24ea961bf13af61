"""python -m fwi_jax.infer: stacked ensembles, flip TTA, device sharding, the submission file,
reference state_dicts, and bad input stopping the run before any compute.

Data are competition-format folders written here (random shots, random velocities); the models
are a reduced network on the demo geometry (full-size (6, 10000, 31) input and (1259, 300)
output, 2 blocks of width 32), so every test but the PyTorch one runs in seconds.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from fwi_jax import ensemble
from fwi_jax import members as members_lib
from fwi_jax.checkpoint import save_params
from fwi_jax.config import load_config
from fwi_jax.data.pipeline import global_batch_ids
from fwi_jax.model import apply_model, create_model
from fwi_jax.preprocess import SOURCE_POSITIONS, flip

REPO = pathlib.Path(__file__).resolve().parent.parent
SMALL_NET = [
    "model.depth=2",
    "model.split=1",
    "model.dim=32",
    "model.heads=2",
    # the reference's input and head (the demo adds a gain and a depth prior; the reference
    # PyTorch model these tests compare with has neither)
    "geometry.time_power=0",
    "model.depth_prior=false",
]
# float32 on both sides; vmap batches the members' matmuls and the mean is a weighted sum, so
# results differ from one-by-one runs only in summation order: ~1e-6 on ~3 km/s. A wrong member
# order, weight, flip axis or missing TTA half moves outputs by > 1e-3 km/s (random nets differ).
TOL = 2e-5


def small_cfg(*extra):
    return load_config("demo", SMALL_NET + list(extra))


def write_sample(folder: pathlib.Path, rng, velocity=True, bad=None):
    folder.mkdir(parents=True)
    for p in SOURCE_POSITIONS:
        shot = (1e-4 * rng.standard_normal((10001, 31))).astype(np.float32)
        if bad == "nan" and p == 150:
            shot[5000, 7] = np.nan
        if bad == "shape" and p == 75:
            shot = shot[:9000]
        np.save(folder / f"receiver_data_src_{p}.npy", shot)
    if velocity:
        # a smooth, depth-increasing field as in the competition, in [1.5, 4.5] km/s
        depth = np.linspace(1.5, 4.5, 1259)[None, :]
        np.save(
            folder / "vp_model.npy",
            (depth + 0.05 * rng.standard_normal((300, 1259))).clip(1.5, 4.5).astype(np.float32),
        )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    ids = ["00ady8InZofxhWZsDT", "1b", "zz_last"]  # 3 samples: the last batch of 2 is padded
    for i in ids:
        write_sample(root / i, rng)
    return root, ids


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three members of one network (seeds 0, 1, 2) and one of another (3 blocks)."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg, other = small_cfg(), small_cfg("model.depth=3")
    paths = []
    for seed in range(3):
        paths.append(save_params(root / f"m{seed}", create_model(cfg, seed)[1], cfg))
    paths.append(save_params(root / "other", create_model(other, 7)[1], other))
    return paths


def single(path, x):
    """One member alone, through plain apply_model (no infer code)."""
    from fwi_jax.checkpoint import load_params

    cfg, params = load_params(path)
    return np.asarray(jax.jit(lambda p, a: apply_model(create_model(cfg)[0], p, a))(params, x))


def inputs(n=2, seed=5):
    return np.random.default_rng(seed).standard_normal((n, 6, 10000, 31)).astype(np.float32)


def predictor(paths, weights=None, **kw):
    specs = [
        members_lib.MemberSpec(str(p), weight=w)
        for p, w in zip(paths, weights or [1.0] * len(paths))
    ]
    loaded = [members_lib.load_member(s) for s in specs]
    return ensemble.Predictor(ensemble.group_members(loaded), **kw)


def test_stacked_members_equal_mean_of_single_runs(members):
    x = inputs()
    pred = predictor(members[:3], tta=False, member_chunk=3)  # all three vmapped at once
    assert len(pred.groups) == 1 and jax.tree.leaves(pred.groups[0].params)[0].shape[0] == 3
    singles = [single(p, x) for p in members[:3]]
    got = pred(x)
    assert got.shape == (2, 1259, 300) and got.dtype == np.float32
    assert np.abs(got - np.mean(singles, axis=0)).max() <= TOL
    assert np.abs(singles[0] - singles[1]).max() > 1e-3  # the members really differ
    # weighted, across two groups (two networks), members given out of order
    pred = predictor([members[3], members[0], members[2]], weights=[2.0, 1.0, 0.5], tta=False)
    assert len(pred.groups) == 2
    want = (2.0 * single(members[3], x) + singles[0] + 0.5 * singles[2]) / 3.5
    assert np.abs(pred(x) - want).max() <= TOL
    # members run in chunks (lax.map over vmapped pairs; one at a time, the CPU default) give the
    # same as one vmap; and the compiled program reports XLA's cost (scripts/bench_infer.py)
    for chunk in (2, None):
        chunked = predictor(members[:3], tta=False, member_chunk=chunk)
        assert np.abs(chunked(x) - np.mean(singles, axis=0)).max() <= TOL
    assert ensemble.default_member_chunk(jax.devices()[0]) == (
        1 if jax.devices()[0].platform == "cpu" else None
    )
    assert chunked.lower(x).compile().cost_analysis()["flops"] > 0


def test_tta_is_half_sum_of_prediction_and_unflipped_prediction_of_flip(members):
    x = inputs(seed=6)
    f = lambda a: single(members[0], a)
    want = 0.5 * (f(x) + f(flip(x))[..., ::-1])
    # the flipped copy in the same batch, and in a second pass (the CPU default)
    for in_batch in (True, False, None):
        got = predictor(members[:1], tta=True, tta_in_batch=in_batch)(x)
        assert np.abs(got - want).max() <= TOL, in_batch
    assert ensemble.default_tta_in_batch(jax.devices()[0]) == (jax.devices()[0].platform != "cpu")
    assert np.abs(got - f(x)).max() > 1e-3  # TTA changes the prediction of a random net
    # two members with TTA: the mean of the members' TTA predictions
    g = lambda a: single(members[1], a)
    want2 = 0.5 * (want + 0.5 * (g(x) + g(flip(x))[..., ::-1]))
    assert np.abs(predictor(members[:2], tta=True)(x) - want2).max() <= TOL


def test_global_batch_ids_follow_the_loaders_host_shards():
    ids = [f"s{i}" for i in range(5)]
    # one host: plain order, the last batch padded
    assert [global_batch_ids(ids, k, 2, 1) for k in range(3)] == [
        ["s0", "s1"],
        ["s2", "s3"],
        ["s4", None],
    ]
    # two hosts, 2 samples each per global batch of 4: host p reads ids[p::2] (the data pipeline's
    # host shard), and its slice comes second in device order for p = 1
    assert [global_batch_ids(ids, k, 2, 2) for k in range(2)] == [
        ["s0", "s2", "s1", "s3"],
        ["s4", None, None, None],
    ]


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "fwi_jax.infer", "--no-progress", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )


@pytest.fixture(scope="module")
def cli_run(dataset, members, tmp_path_factory):
    """One CLI run with --val and --plot over the dataset, via an ensemble file."""
    root, _ = dataset
    out_dir = tmp_path_factory.mktemp("out")
    ens = out_dir / "ensemble.json"
    # relative paths are read from the ensemble file's folder
    ens.write_text(
        json.dumps(
            [
                {"checkpoint": os.path.relpath(members[0], out_dir), "weight": 1.0},
                {"checkpoint": str(members[1])},
                {"checkpoint": str(members[3]), "config": None, "weight": 2.0},
            ]
        )
    )
    out = out_dir / "submission.npz"
    proc = run_cli(
        "--data",
        root,
        "--ensemble",
        ens,
        "--out",
        out,
        "--batch",
        2,
        "--val",
        "--plot",
        1,
        "--misfit",
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_submission_ids_dtype_shape_and_independent_mape(dataset, members, cli_run):
    from sklearn.metrics import mean_absolute_percentage_error

    root, ids = dataset
    out, proc = cli_run
    with np.load(out) as sub:  # never allow_pickle
        assert sorted(sub.files) == sorted(ids)
        preds = {k: sub[k] for k in sub.files}
    scores = {}
    for sid, p in preds.items():
        assert p.dtype == np.float64 and p.shape == (300, 1259)
        truth = np.load(root / sid / "vp_model.npy")  # (x, depth) like the submission
        scores[sid] = mean_absolute_percentage_error(truth.ravel(), p.ravel())  # sklearn's own MAPE
    # per-sample CSV and printed mean agree with sklearn (eps differs: 1e-8 vs float64 eps, |Δ| <
    # 1e-8)
    lines = out.with_suffix(".csv").read_text().splitlines()
    assert lines[0] == "id,mape,misfit"
    rows = [line.split(",") for line in lines[1:]]
    assert [r[0] for r in rows] == ids
    for sid, m, _ in rows:
        assert abs(float(m) - scores[sid]) < 1e-7
    # --misfit: the data misfit of the first prediction, recomputed by the physics module
    from fwi_jax import physics

    want_misfit = physics.misfit(
        physics.Forward(), preds[ids[0]], physics.read_observed(root / ids[0])
    )
    assert float(rows[0][2]) == pytest.approx(want_misfit, rel=1e-5)
    printed = float(proc.stdout.split("validation MAPE ")[1].split()[0])
    assert abs(printed - np.mean(list(scores.values()))) < 1e-6
    # the rate without the compile counts the samples after the first batch of 2: one
    assert "after the first batch: 1 samples in " in proc.stdout
    # and the values are the weighted ensemble with TTA on each sample's input
    from fwi_jax.data.io import read_sample

    x = np.stack([read_sample(root / sid)[0] for sid in ids])
    tta = lambda p: 0.5 * (single(p, x) + single(p, flip(x))[..., ::-1])
    want = (tta(members[0]) + tta(members[1]) + 2.0 * tta(members[3])) / 4.0
    got = np.stack([preds[sid].T for sid in ids])
    assert np.abs(got - want).max() <= TOL


def test_plot_written(cli_run, dataset):
    import matplotlib.image

    out, _ = cli_run
    pngs = sorted((out.parent / "submission_plots").glob("*.png"))
    assert [p.stem for p in pngs] == [dataset[1][0]]
    img = matplotlib.image.imread(pngs[0])
    assert img.shape[0] > 300 and img[..., :3].std() > 0.05


def test_one_and_four_devices_agree(dataset, members, tmp_path):
    root, ids = dataset
    outs = {}
    for n in (1, 4):
        env = dict(
            os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu"
        )
        out = tmp_path / f"sub{n}.npz"
        proc = run_cli(
            "--data",
            root,
            "--checkpoints",
            members[0],
            members[2],
            "--out",
            out,
            "--batch",
            4,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        assert f"{n} cpu device(s), global batch 4" in proc.stdout
        with np.load(out) as sub:
            outs[n] = {k: sub[k] for k in sub.files}
    assert sorted(outs[4]) == sorted(ids)
    for sid in ids:  # same program, batch split 1 per device: float32 summation order only
        assert np.abs(outs[1][sid] - outs[4][sid]).max() <= TOL


@pytest.mark.parametrize("bad", ["nan", "shape", "missing"])
def test_bad_sample_stops_before_compute_and_leaves_no_file(dataset, members, tmp_path, bad):
    root, ids = dataset
    data = tmp_path / "data"
    data.mkdir()
    for sid in ids:
        (data / sid).symlink_to(root / sid)
    write_sample(
        data / "broken_one", np.random.default_rng(1), bad=None if bad == "missing" else bad
    )
    if bad == "missing":
        (data / "broken_one" / "receiver_data_src_225.npy").unlink()
    out = tmp_path / "submission.npz"
    proc = run_cli("--data", data, "--checkpoints", members[0], "--out", out)
    assert proc.returncode == 2
    assert "broken_one" in proc.stderr and "nothing was computed" in proc.stderr
    assert "ensemble" not in proc.stdout  # the run never reached the devices
    assert list(tmp_path.glob("submission*")) == []


def test_user_errors_name_the_culprit(dataset, members, tmp_path):
    root, _ = dataset
    proc = run_cli("--data", root, "--checkpoints", tmp_path / "nope", "--out", tmp_path / "s.npz")
    assert proc.returncode == 2 and "nope does not exist" in proc.stderr
    (tmp_path / "ref.pth").write_bytes(b"")
    proc = run_cli(
        "--data", root, "--checkpoints", tmp_path / "ref.pth", "--out", tmp_path / "s.npz"
    )
    assert proc.returncode == 2 and "carries no config" in proc.stderr
    ids = tmp_path / "ids.txt"
    ids.write_text("1b\nnot_there\n")
    proc = run_cli(
        "--data", root, "--list", ids, "--checkpoints", members[0], "--out", tmp_path / "s.npz"
    )
    assert proc.returncode == 2 and "not_there" in proc.stderr
    assert list(tmp_path.glob("s*.npz")) == []


def test_read_only_out_folder_fails_before_any_compute(dataset, members, tmp_path, mount_tmpfs):
    root, _ = dataset
    ro = mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    proc = run_cli("--data", root, "--checkpoints", members[0], "--out", ro / "s.npz")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: --out folder {ro} is not writable: Read-only file system\n" in proc.stderr
    assert "ensemble" not in proc.stdout  # the run never reached the devices


@pytest.mark.full
def test_reference_state_dict_through_cli_matches_pytorch(tmp_path):
    """A reference-solution state_dict (random weights, timm pretrain pos-embed grid, _orig_mod.
    prefix as torch.compile saves it) run by `python -m fwi_jax.infer --config tiny_s8` with flip
    TTA matches the PyTorch model with the same TTA. Full-size tiny_s8 (the reference's fixed
    architecture), batch 1, one sample. Tolerance 1e-4 km/s: the full-size forward parity bound of
    tests/test_model.py (float32, different summation orders); the float64 write adds nothing."""
    import torch

    from fwi_jax.data.io import read_sample

    from torch_reference import ReferenceModel, randomize_

    cfg = load_config("tiny_s8")
    ref = randomize_(ReferenceModel(cfg), seed=3).eval()
    torch.save({f"_orig_mod.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "ref.pth")
    write_sample(tmp_path / "data" / "only", np.random.default_rng(2), velocity=False)
    out = tmp_path / "sub.npz"
    proc = run_cli(
        "--data",
        tmp_path / "data",
        "--checkpoints",
        tmp_path / "ref.pth",
        "--config",
        "tiny_s8",
        "--out",
        out,
        "--batch",
        1,
    )
    assert proc.returncode == 0, proc.stderr
    x = torch.from_numpy(read_sample(tmp_path / "data" / "only")[0][None])
    with torch.no_grad():
        # flip: channels, receivers / x
        want = 0.5 * (ref(x) + ref(x.flip(1, 3)).flip(2))[0].numpy()
    with np.load(out) as sub:
        assert sub.files == ["only"]
        got = sub["only"].T
    assert np.abs(got - want).max() <= 1e-4


def test_reference_safetensors_small_grid_through_cli(tmp_path):
    """The same path at a reduced grid (square head patch, as the reference's pixel shuffle needs),
    from .safetensors, with --config given as a JSON file: fast, so it runs in every test pass.
    Tolerance 1e-5 km/s: the small-grid parity bound of tests/test_convert.py."""
    import torch
    from safetensors.torch import save_file

    from fwi_jax.data.io import read_sample

    from torch_reference import ReferenceModel, randomize_

    cfg = small_cfg("geometry.head_patch=(56, 56)")
    ref = randomize_(ReferenceModel(cfg, pretrained_grid=False), seed=4).eval()
    save_file(
        {k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "ref.safetensors"
    )
    (tmp_path / "small.json").write_text(cfg.to_json())
    rng = np.random.default_rng(3)
    for sid in ("a", "b"):
        write_sample(tmp_path / "data" / sid, rng, velocity=False)
    out = tmp_path / "sub.npz"
    proc = run_cli(
        "--data",
        tmp_path / "data",
        "--checkpoints",
        tmp_path / "ref.safetensors",
        "--config",
        tmp_path / "small.json",
        "--out",
        out,
        "--batch",
        2,
    )
    assert proc.returncode == 0, proc.stderr
    x = torch.from_numpy(np.stack([read_sample(tmp_path / "data" / s)[0] for s in ("a", "b")]))
    with torch.no_grad():
        want = (0.5 * (ref(x) + ref(x.flip(1, 3)).flip(2))).numpy()
    with np.load(out) as sub:
        got = np.stack([sub["a"].T, sub["b"].T])
    assert np.abs(got - want).max() <= 1e-5


def test_steady_rate_counts_only_batches_computed_after_the_first(dataset):
    """The "after the first batch" rate: with synchronous dispatch (the CPU tuning) a batch is
    computed inside its dispatch call, which for batch k+1 comes before batch k is finished.
    A stand-in ensemble that computes for 0.25 s per batch, 3 batches of 1: the steady window
    holds the last 2 batches, so at least 0.5 s for 2 samples (counting from the first batch's
    fetch would give ~0.25 s, a rate twice too high)."""
    import time

    from fwi_jax.infer import predict_samples

    root, ids = dataset
    cfg = small_cfg()

    class Computing:
        groups = [type("Group", (), {"cfg": cfg})()]
        uncertainty = False

        def dispatch(self, x):
            time.sleep(0.25)  # the batch's compute, done before dispatch returns
            return np.zeros((len(x), *cfg.geometry.out_shape), np.float32)

    result = predict_samples(Computing(), root, ids, 1, progress=False)
    n, seconds = result.steady
    assert n == 2 and seconds >= 0.5, result.steady
