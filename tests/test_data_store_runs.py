"""Packed stores as ``--data`` of python -m fwi_jax.train and python -m fwi_jax.infer, and float16
host batches (``data.host_dtype="store"``, the default) cast on the device: bit-identical to
batches converted to float32 on the host.

Data: 8 random competition-format samples packed into a float16 and a float32 store; the network
is test_train's small one on the demo geometry (2 blocks of width 64), so each run takes seconds.
"""

import json

import jax
import numpy as np
import pytest
from test_train import SMALL as TRAIN_SMALL

from fwi_jax import infer
from fwi_jax import train as T
from fwi_jax.checkpoint import load_params, save_params
from fwi_jax.config import load_config
from fwi_jax.data import io, pack
from fwi_jax.model import create_model

SMALL = [*TRAIN_SMALL, "train.log_every_steps=1", "train.epochs=3"]  # the last value counts
IDS = [f"s{i:02d}" for i in range(8)]
TRAIN, VAL = IDS[:4], IDS[4:7]  # s07 is in the stores but in neither list


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(folders, {dtype: store}, lists folder with train.txt / val.txt)."""
    root = tmp_path_factory.mktemp("store_runs")
    rng = np.random.default_rng(0)
    for i in IDS:
        d = root / "folders" / i
        d.mkdir(parents=True)
        for name in io.SHOT_FILES:
            np.save(d / name, (1e-4 * rng.standard_normal((10001, 31))).astype(np.float32))
        depth = np.linspace(0.0, 1.5, 1259, dtype=np.float32)[None, :]
        np.save(
            d / io.VELOCITY_FILE, 1.8 + rng.uniform(0, 1) + depth + np.zeros((300, 1), np.float32)
        )
    stores = {d: root / f"store_{d}" for d in pack.DTYPES}
    for d, out in stores.items():
        pack.pack(root / "folders", out, dtype=d, progress=False)
    (root / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (root / "val.txt").write_text("\n".join(VAL) + "\n")
    return root / "folders", stores, root


def _train_args(store, lists, workdir, *extra):
    return [
        "--no-progress",
        "--config",
        "demo",
        "--data",
        str(store),
        "--train-list",
        str(lists / "train.txt"),
        "--val-list",
        str(lists / "val.txt"),
        "--workdir",
        str(workdir),
        *[a for s in SMALL + list(extra) for a in ("--set", s)],
    ]


@pytest.mark.full  # fast sibling: test_infer_on_stores reads the float16 store
def test_train_on_float16_store_fast_path_bit_identical_to_host_conversion(data, tmp_path, capsys):
    """3 steps + 3 validations from the float16 store through main(): float16 batches cast on the
    device give the same params, EMA and validation MAPE bit for bit as host-converted batches."""
    _, stores, lists = data
    runs = {}
    for host_dtype in ("store", "float32"):
        T.TRACES.clear()
        workdir = tmp_path / host_dtype
        assert (
            T.main(_train_args(stores["float16"], lists, workdir, f"data.host_dtype={host_dtype}"))
            == 0
        )
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["steps"] == 3 and np.isfinite(summary["best_mape"])
        assert dict(T.TRACES) == {"train_step": 1, "eval_step": 1}
        runs[host_dtype] = (
            summary,
            load_params(workdir / "final")[1],
            load_params(workdir / "best")[1],
        )
        vals = [
            json.loads(ln)["val/mape"]
            for ln in (workdir / "metrics.jsonl").read_text().splitlines()
            if "val/mape" in ln
        ]
        runs[host_dtype] += (vals,)
    (s_fast, final_fast, best_fast, val_fast), (s_ref, final_ref, best_ref, val_ref) = (
        runs["store"],
        runs["float32"],
    )
    assert len(val_fast) == 3 and val_fast == val_ref and s_fast["best_mape"] == s_ref["best_mape"]
    for a, b in zip(
        jax.tree.leaves((final_fast, best_fast)),
        jax.tree.leaves((final_ref, best_ref)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    _, fresh = create_model(load_config("demo", SMALL), 0)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(final_fast), jax.tree.leaves(fresh))
    )


@pytest.mark.full
def test_train_cli_on_store_equals_folders(data, tmp_path, capsys):
    """A float32 store trains exactly as the folders it was packed from (the CLI in a subprocess
    for the store, main() in this process for the folders)."""
    import subprocess
    import sys

    from test_train import ROOT

    folders, stores, lists = data
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fwi_jax.train",
            *_train_args(stores["float32"], lists, tmp_path / "store", "train.epochs=1"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert T.main(_train_args(folders, lists, tmp_path / "folders", "train.epochs=1")) == 0
    a, b = (load_params(tmp_path / name / "final")[1] for name in ("store", "folders"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert (
        json.loads(proc.stdout.strip().splitlines()[-1])["best_mape"]
        == json.loads(capsys.readouterr().out.strip().splitlines()[-1])["best_mape"]
    )


def test_train_on_store_user_errors(data, tmp_path, capsys):
    _, stores, lists = data
    (tmp_path / "bad.txt").write_text("s00\nnot_in_store\nalso_missing\n")
    assert (
        T.main(
            [
                "--no-progress",
                "--config",
                "demo",
                "--data",
                str(stores["float16"]),
                "--train-list",
                str(tmp_path / "bad.txt"),
                "--workdir",
                str(tmp_path / "w"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "2 listed id(s) are not in the packed store" in err and "not_in_store, also_missing" in err
    )
    assert "bad.txt" in err
    assert (
        T.main(_train_args(stores["float16"], lists, tmp_path / "w2", "data.host_dtype=float64"))
        == 2
    )
    assert "data.host_dtype='float64'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def member(tmp_path_factory):
    cfg = load_config("demo", SMALL)
    return save_params(tmp_path_factory.mktemp("member") / "m0", create_model(cfg, 3)[1], cfg)


def _infer(data_root, member, out, *extra):
    assert (
        infer.main(
            [
                "--no-progress",
                "--data",
                str(data_root),
                "--checkpoints",
                str(member),
                "--out",
                str(out),
                "--batch",
                "2",
                *map(str, extra),
            ]
        )
        == 0
    )
    with np.load(out) as sub:
        return {k: sub[k] for k in sub.files}


def test_infer_on_stores(data, member, tmp_path, capsys):
    """infer --data STORE: a float16 store gives the same predictions with float16 batches (cast on
    the device) as with host conversion; a float32 store the same as its folders; --list names
    ids in the store; --val and --plot work from a store."""
    folders, stores, lists = data
    fast = _infer(
        stores["float16"],
        member,
        tmp_path / "fast.npz",
        "--list",
        lists / "val.txt",
        "--val",
        "--plot",
        1,
    )
    ref = _infer(
        stores["float16"],
        member,
        tmp_path / "ref.npz",
        "--list",
        lists / "val.txt",
        "--val",
        "--set",
        "data.host_dtype=float32",
    )
    assert sorted(fast) == sorted(ref) == VAL
    for k in VAL:
        assert fast[k].dtype == np.float64 and fast[k].shape == (300, 1259)
        np.testing.assert_array_equal(fast[k], ref[k])
    assert (tmp_path / "fast.csv").read_text() == (tmp_path / "ref.csv").read_text()
    assert len(list((tmp_path / "fast_plots").glob("*.png"))) == 1
    a = _infer(stores["float32"], member, tmp_path / "s32.npz", "--no-tta")  # every id of the store
    b = _infer(folders, member, tmp_path / "f.npz", "--no-tta")
    assert sorted(a) == sorted(b) == IDS
    for k in IDS:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(fast[VAL[0]], a[VAL[0]])  # float16 rounding does change the input
    capsys.readouterr()


def test_infer_store_user_errors(data, member, tmp_path, capsys):
    folders, stores, _ = data

    def err(*argv):
        assert (
            infer.main(
                [
                    "--no-progress",
                    "--checkpoints",
                    str(member),
                    "--out",
                    str(tmp_path / "o.npz"),
                    *map(str, argv),
                ]
            )
            == 2
        )
        assert not (tmp_path / "o.npz").exists()
        return capsys.readouterr().err

    (tmp_path / "l.txt").write_text("s01\nnope\n")
    e = err("--data", stores["float16"], "--list", tmp_path / "l.txt")
    assert "1 listed id(s) are not in the packed store" in e and "nope" in e
    no_v = tmp_path / "no_v"
    (tmp_path / "test_folders").mkdir()
    for i in IDS[:2]:
        (tmp_path / "test_folders" / i).mkdir()
        for name in io.SHOT_FILES:
            (tmp_path / "test_folders" / i / name).symlink_to(folders / i / name)
    pack.pack(tmp_path / "test_folders", no_v, dtype="float16", progress=False)
    assert "v.npy: missing file" in err("--data", no_v, "--val")
    # without --val a store without velocities is fine
    got = _infer(no_v, member, tmp_path / "nv.npz")
    assert sorted(got) == IDS[:2]
    capsys.readouterr()
    # a narrower velocity range than the store was packed with: samples checked again, named
    e = err("--data", stores["float16"], "--set", "data.v_range=(2.5,10.0)")
    assert "bad sample(s) of 8" in e and "outside the allowed range [2.5, 10.0]" in e


def test_resume_accepts_a_config_saved_before_host_dtype(tmp_path):
    """config.json of a run started before data.host_dtype existed still matches its config."""
    cfg = load_config("demo", SMALL)
    saved = json.loads(cfg.to_json())
    del saved["data"]["host_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert T._saved_config(tmp_path / "config.json") == json.loads(cfg.to_json())
    assert T._saved_config(tmp_path / "config.json") != json.loads(
        cfg.replace(**{"data.host_dtype": "float32"}).to_json()
    )
    (tmp_path / "config.json").write_text(json.dumps({**saved, "no_such_section": {}}))
    assert T._saved_config(tmp_path / "config.json") is None
