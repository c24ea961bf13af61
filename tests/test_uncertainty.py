"""``python -m fwi_jax.infer --uncertainty`` and ``model.error_head`` (fwi_jax.uncertainty).

The written confidence maps are checked against NumPy over every member's every TTA view, each
computed by plain `apply_model` (no ensemble code): the weighted spread of the velocities around
the ensemble's mean, and the error heads' scale, averaged with the members' weights."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwi_jax import ensemble
from fwi_jax import members as members_lib
from fwi_jax import uncertainty as unc
from fwi_jax.checkpoint import load_params, save_params
from fwi_jax.config import load_config
from fwi_jax.loss import laplace_nll
from fwi_jax.model import apply_model, create_model
from fwi_jax.preprocess import SOURCE_POSITIONS, flip

REPO = pathlib.Path(__file__).resolve().parent.parent
SMALL_NET = [
    "model.depth=2",
    "model.split=1",
    "model.dim=32",
    "model.heads=2",
    "geometry.time_power=0",
]


def small_cfg(*extra):
    return load_config("demo", SMALL_NET + list(extra))


def with_random_error_head(params, seed):
    """The error head starts at zero weights (a constant log-scale): give it random ones, so that
    its scale differs between pixels, samples and members, and a prior that puts it near the
    random members' spread."""
    rng = np.random.default_rng(seed)
    head = {
        k: (0.05 * rng.standard_normal(np.shape(a))).astype(np.float32)
        for k, a in params["error_head"].items()
    }
    prior = np.full(np.shape(params["error_prior"]), -7.0, np.float32)  # b ~ 0.001, as the spread
    return {**params, "error_head": head, "error_prior": prior}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four samples whose velocities and shots differ, so that scores and errors differ."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    ids = ["a0", "b1", "c2", "d3"]
    for k, sid in enumerate(ids):
        folder = root / sid
        folder.mkdir()
        for p in SOURCE_POSITIONS:
            shot = ((k + 1) * 1e-3 * rng.standard_normal((10001, 31))).astype(np.float32)
            np.save(folder / f"receiver_data_src_{p}.npy", shot)
        depth = np.linspace(1.5 + 0.3 * k, 4.5, 1259)[None, :]
        v = depth + 0.1 * rng.standard_normal((300, 1259))
        np.save(folder / "vp_model.npy", v.clip(1.5, 4.5).astype(np.float32))
    return root, ids


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two members with error heads (one network) and one without (another network)."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg, other = small_cfg("model.error_head=true"), small_cfg("model.depth=3")
    paths = [
        save_params(
            root / f"h{seed}", with_random_error_head(create_model(cfg, seed)[1], seed), cfg
        )
        for seed in (0, 1)
    ]
    paths.append(save_params(root / "plain", create_model(other, 7)[1], other))
    return paths


def views_of(path, x):
    """One member's two TTA views (unflipped) and, with an error head, their log-scales, through
    plain apply_model: ([v, v_flip], [s, s_flip] or None), each (B, depth, x)."""
    cfg, params = load_params(path)
    graphdef = create_model(cfg)[0]
    head = cfg.model.error_head
    f = jax.jit(lambda p, a: apply_model(graphdef, p, a, log_scale=head))
    a, b = f(params, x), f(params, flip(x))
    if not head:
        return [np.asarray(a), np.asarray(b)[..., ::-1]], None
    return (
        [np.asarray(a[0]), np.asarray(b[0])[..., ::-1]],
        [np.asarray(a[1]), np.asarray(b[1])[..., ::-1]],
    )


def numpy_map(paths, weights, x):
    """The ensemble's mean and confidence map in NumPy (float64) over members x views."""
    runs = [views_of(p, x) for p in paths]
    w = np.asarray(weights, np.float64)
    mean = sum(wm * 0.5 * (v[0] + v[1]) for wm, (v, _) in zip(w, runs)) / w.sum()
    var = sum(wm / 2 * (vv - mean) ** 2 for wm, (v, _) in zip(w, runs) for vv in v) / w.sum()
    spread = np.sqrt(var) / mean
    with_head = [(wm, s) for wm, (_, s) in zip(w, runs) if s is not None]
    scale = sum(wm * 0.5 * (np.exp(s[0]) + np.exp(s[1])) for wm, s in with_head) / sum(
        wm for wm, _ in with_head
    )
    return mean, np.sqrt(scale**2 + spread**2), spread, scale


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "fwi_jax.infer", "--no-progress", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )


def test_written_maps_equal_numpy_over_members_and_views(dataset, members, tmp_path):
    from scipy.stats import spearmanr

    from fwi_jax.data.io import read_sample

    root, ids = dataset
    weights = [1.0, 2.0, 0.5]
    ens = tmp_path / "ensemble.json"
    ens.write_text(
        json.dumps([{"checkpoint": str(p), "weight": w} for p, w in zip(members, weights)])
    )
    out = tmp_path / "sub.npz"
    proc = run_cli(
        "--data", root, "--ensemble", ens, "--out", out, "--batch", 3, "--val", "--uncertainty",
        "--plot", 1,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    x = np.stack([read_sample(root / sid)[0] for sid in ids])
    mean, want, spread, scale = numpy_map(members, weights, x)
    # both ingredients matter here: each is the larger one somewhere
    assert (spread > 2 * scale).any() and (scale > 2 * spread).any()
    with np.load(unc.map_path(out)) as z:  # never allow_pickle
        assert sorted(z.files) == sorted(ids)
        maps = {k: z[k] for k in z.files}
    for j, sid in enumerate(ids):
        got = maps[sid]
        assert got.dtype == np.float16 and got.shape == (300, 1259)  # (x, depth), as submitted
        np.testing.assert_allclose(got.astype(np.float64), want[j].T, rtol=2e-3, atol=1e-6)
    # the submission is the competition's format, and the ensemble's weighted TTA mean
    with np.load(out) as sub:
        assert sorted(sub.files) == sorted(ids)
        assert all(sub[sid].dtype == np.float64 for sid in ids)
        got_mean = np.stack([sub[sid].T for sid in ids])
    assert np.abs(got_mean - mean).max() <= 2e-5
    # the per-sample CSV: MAPE and score (the map's mean)
    lines = out.with_suffix(".csv").read_text().splitlines()
    assert lines[0] == "id,mape,uncertainty"
    rows = {r[0]: (float(r[1]), float(r[2])) for r in (ln.split(",") for ln in lines[1:])}
    for j, sid in enumerate(ids):
        assert rows[sid][1] == pytest.approx(want[j].mean(), rel=1e-4)
    # the statistics against the labels: Spearman as scipy's, deciles as NumPy's
    stats = json.loads(unc.stats_path(out).read_text())
    assert stats["samples"] == 4
    scores, mapes = [rows[i][1] for i in ids], [rows[i][0] for i in ids]
    assert len(set(scores)) == 4
    assert stats["spearman_score_mape"] == pytest.approx(spearmanr(scores, mapes)[0], abs=1e-9)
    truth = np.stack([np.load(root / sid / "vp_model.npy").T for sid in ids]).astype(np.float64)
    err = np.abs(got_mean - truth) / truth
    order = np.argsort(want.ravel(), kind="stable")
    deciles = [part.mean() for part in np.array_split(err.ravel()[order], 10)]
    # the map's float16 rounding may move pixels across a decile edge: a small change only
    np.testing.assert_allclose(stats["decile_mean_relative_error"], deciles, rtol=5e-3)
    assert stats["top_decile_ratio"] == pytest.approx(deciles[-1] / err.mean(), rel=5e-3)
    assert "Spearman(score, MAPE)" in proc.stdout and "top decile" in proc.stdout
    # the plot has the uncertainty panel: wider than the three-panel figure
    import matplotlib.image

    (png,) = (out.parent / "sub_plots").glob("*.png")
    assert matplotlib.image.imread(png).shape[1] == 19 * 80


def test_nothing_to_measure_is_one_error_line(dataset, members, tmp_path):
    root, _ = dataset
    out = tmp_path / "sub.npz"
    proc = run_cli(
        "--data", root, "--checkpoints", members[2], "--out", out, "--no-tta", "--uncertainty"
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --uncertainty: nothing to measure")
    assert list(tmp_path.iterdir()) == []  # nothing computed, nothing written


def loaded(paths, weights):
    specs = [members_lib.MemberSpec(str(p), weight=w) for p, w in zip(paths, weights)]
    return ensemble.group_members([members_lib.load_member(s) for s in specs])


def test_uncertainty_keeps_the_mean_and_measures_what_there_is(members):
    """The mean with --uncertainty is the mean without; one member's map is its TTA spread
    (no head), its head's scale (no TTA), or both."""
    x = np.random.default_rng(3).standard_normal((2, 6, 10000, 31)).astype(np.float32)
    groups = loaded(members, [1.0, 2.0, 0.5])
    plain = ensemble.Predictor(groups)(x)
    mean, conf = ensemble.Predictor(groups, uncertainty=True)(x)
    assert np.array_equal(mean, plain)
    assert conf.shape == mean.shape and np.all(conf > 0)
    (v, _), (head_v, head_s) = views_of(members[2], x), views_of(members[0], x)
    _, tta_only = ensemble.Predictor(loaded(members[2:], [1.0]), uncertainty=True)(x)
    want = np.abs(v[0] - v[1]) / 2 / (0.5 * (v[0] + v[1]))  # the std of two equal-weight values
    np.testing.assert_allclose(tta_only, want, rtol=1e-3, atol=1e-7)
    _, head_only = ensemble.Predictor(loaded(members[:1], [1.0]), tta=False, uncertainty=True)(x)
    np.testing.assert_allclose(head_only, np.exp(head_s[0]), rtol=1e-5)
    _, both = ensemble.Predictor(loaded(members[:1], [1.0]), uncertainty=True)(x)
    spread = np.abs(head_v[0] - head_v[1]) / (head_v[0] + head_v[1])
    scale = 0.5 * (np.exp(head_s[0]) + np.exp(head_s[1]))
    np.testing.assert_allclose(both, np.sqrt(scale**2 + spread**2), rtol=1e-3)


def test_error_head_is_off_in_every_shipped_config_and_leaves_the_rest_unchanged():
    for path in sorted((REPO / "configs").glob("*.py")):
        assert load_config(path.stem).model.error_head is False, path.stem
    cfg = small_cfg()
    plain = create_model(cfg, 0)[1]
    graphdef, params = create_model(cfg.replace(**{"model.error_head": True}), 0)
    assert set(params) - set(plain) == {"error_head", "error_prior"}
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves({k: params[k] for k in plain})):
        assert np.array_equal(a, b)  # the other parameters draw the same values
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 6, 10000, 31)), jnp.float32)
    v, s = apply_model(graphdef, params, x, log_scale=True)
    assert np.array_equal(v, apply_model(create_model(cfg, 0)[0], plain, x))
    assert np.allclose(s, -3.0)  # zero weights: the prior's start, log 0.05
    # the likelihood's gradient reaches the error head alone (the velocity trains as without
    # it), or with model.error_head_joint the backbone too (never the velocity's own head)
    target, params = v + 0.1, with_random_error_head(params, 0)
    joint_cfg = cfg.replace(**{"model.error_head": True, "model.error_head_joint": True})
    for g, joint in ((graphdef, False), (create_model(joint_cfg, 0)[0], True)):
        nll = lambda p, g=g: laplace_nll(apply_model(g, p, x, log_scale=True)[1], v, target)
        for key, grad in jax.grad(nll)(params).items():
            norm = sum(float(jnp.abs(a).sum()) for a in jax.tree.leaves(grad))
            own = key in ("error_head", "error_prior")
            assert (norm > 0) == (own or (joint and key not in ("head", "depth_prior"))), key


def test_laplace_nll_is_minimal_at_the_mean_relative_error():
    v = jnp.full((1, 4, 5), 2.0)
    pred = v * (1 + jnp.linspace(-0.2, 0.2, 20).reshape(1, 4, 5))
    e = float(jnp.mean(jnp.abs(pred - v) / v))
    s = jnp.linspace(-6, 0, 601)
    nll = jnp.array([laplace_nll(jnp.full(v.shape, si), pred, v) for si in s])
    assert float(jnp.exp(s[jnp.argmin(nll)])) == pytest.approx(e, rel=1e-2)


def test_spearman_and_deciles_match_scipy_and_numpy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = rng.standard_normal(50)
    b = a + rng.standard_normal(50)
    a[:5] = a[0]  # ties get their mean rank
    assert unc.spearman(a, b) == pytest.approx(spearmanr(a, b)[0], abs=1e-12)
    assert np.isnan(unc.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    maps = [np.arange(20.0).reshape(4, 5), np.arange(20.0, 40.0).reshape(4, 5)]
    errors = [2 * m for m in maps]
    dec, mean = unc.decile_errors(maps, errors)
    np.testing.assert_allclose(dec, [2 * (4 * k + 1.5) for k in range(10)])
    assert mean == pytest.approx(39.0)
    with pytest.raises(ValueError, match="map pixels"):
        unc.decile_errors(maps, errors[:1])


def test_weighted_spread_and_scale_match_numpy():
    rng = np.random.default_rng(1)
    views = [rng.uniform(2, 3, (3, 2, 2, 4, 5)), rng.uniform(2, 3, (1, 1, 2, 4, 5))]
    weights = [np.array([1.0, 2.0, 0.5]), np.array([3.0])]
    mean = sum(np.einsum("m,mvbhw->bhw", w / v.shape[1], v) for v, w in zip(views, weights)) / 6.5
    var = sum(
        np.einsum("m,mvbhw->bhw", w / v.shape[1], (v - mean) ** 2) for v, w in zip(views, weights)
    )
    got = unc.weighted_spread(
        [jnp.asarray(v, jnp.float32) for v in views],
        [jnp.asarray(w, jnp.float32) for w in weights],
        jnp.asarray(mean, jnp.float32),
    )
    np.testing.assert_allclose(got, np.sqrt(var / 6.5) / mean, rtol=1e-4)
    s = rng.uniform(-4, -2, (3, 2, 2, 4, 5))
    got = unc.weighted_scale(
        [jnp.asarray(s), None], [jnp.asarray(weights[0]), jnp.asarray(weights[1])]
    )
    want = np.einsum("m,mbhw->bhw", weights[0], np.exp(s).mean(axis=1)) / 3.5
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert unc.weighted_scale([None], [jnp.ones(1)]) is None


def test_maps_beyond_float16_are_clipped_and_counted():
    a = np.array([[0.05, 7e4], [np.float32(1e9), 1.0]], np.float32)
    stored, over = unc.to_float16(a)
    assert over == 2 and stored.dtype == np.float16 and np.all(np.isfinite(stored))
    assert stored[0, 1] == unc.FLOAT16_MAX and stored[0, 0] == np.float16(0.05)
