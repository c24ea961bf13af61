"""Packed store: pack-then-read equals reading the folders, atomic writes, the loader over a store,
the CLI; and `io.read_sample`'s fast path against its checked path."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from test_data_io import write_sample

from fwi_jax.config import Config
from fwi_jax.data import io, pack
from fwi_jax.data.pipeline import FolderSource, make_loader

N = 5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """N real-shaped samples with velocities, N - 2 without (test-data layout)."""
    root = tmp_path_factory.mktemp("folders")
    ids = [f"s{i}" for i in range(N)]
    for k, i in enumerate(ids):
        write_sample(root / "train" / i, seed=k)
    for k in range(N - 2):
        write_sample(root / "test" / f"t{k}", seed=100 + k, velocity=False)
    return root, ids


@pytest.fixture(scope="module")
def stores(folders, tmp_path_factory):
    root, ids = folders
    out = tmp_path_factory.mktemp("stores")
    return {
        d: (out / d, pack.pack(root / "train", out / d, dtype=d, progress=False))
        for d in pack.DTYPES
    }


def test_pack_float32_bit_exact(folders, stores):
    root, ids = folders
    out, index = stores["float32"]
    assert sorted(p.name for p in out.iterdir()) == ["ids.txt", "index.json", "v.npy", "x.npy"]
    assert json.loads((out / "index.json").read_text()) == index
    assert (index["n"], index["dtype"], index["has_velocity"]) == (N, "float32", True)
    assert index["x_shape"] == [N, 6, 10000, 31] and index["v_shape"] == [N, 1259, 300]
    assert (out / "ids.txt").read_text().split() == ids
    x = np.load(out / "x.npy", mmap_mode="r", allow_pickle=False)
    v = np.load(out / "v.npy", mmap_mode="r", allow_pickle=False)
    assert x.dtype == np.float32 and v.dtype == np.float32
    src = pack.PackedSource(out, ids[::-1])  # element i is ids[i], whatever the store's row order
    ref = FolderSource(root / "train", ids[::-1])
    for k, i in enumerate(ids):
        xf, vf = io.read_sample(root / "train" / i)
        np.testing.assert_array_equal(x[k], xf)
        np.testing.assert_array_equal(v[k], vf)
        a, b = src[N - 1 - k], ref[N - 1 - k]
        assert sorted(a) == sorted(b) == ["id", "v", "x"] and str(a["id"]) == i
        for key in a:
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])


def test_pack_float16_within_rounding(folders, stores):
    root, ids = folders
    out, index = stores["float16"]
    assert index["dtype"] == "float16"
    assert np.load(out / "x.npy", mmap_mode="r").dtype == np.float16
    src = pack.PackedSource(out, ids)
    for k, i in enumerate(ids):
        xf, vf = io.read_sample(root / "train" / i)
        e = src[k]
        assert e["x"].dtype == np.float32 and e["x"].shape == xf.shape
        # exactly rounded
        np.testing.assert_array_equal(e["x"], xf.astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(e["x"], xf, rtol=2.0**-11, atol=2.0**-24)
        np.testing.assert_array_equal(e["v"], vf)  # velocities stay float32


def test_half_to_float32_every_finite_half():
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    h = h[np.isfinite(h)]
    np.testing.assert_array_equal(
        pack.half_to_float32(h).view(np.uint32), h.astype(np.float32).view(np.uint32)
    )
    # several chunks, a ragged one
    x = np.random.default_rng(0).standard_normal((3, 70001)).astype(np.float16)
    out = np.empty(x.shape, np.float32)
    assert pack.half_to_float32(x, out) is out
    np.testing.assert_array_equal(out, x.astype(np.float32))


def test_pack_without_velocity_and_eval_loader(folders, tmp_path):
    root, _ = folders
    index = pack.pack(root / "test", tmp_path / "p", progress=False)
    assert not index["has_velocity"] and index["v_shape"] is None
    assert not (tmp_path / "p" / "v.npy").exists()

    def eval_batches(source):  # ids None: every sample of the store or sub-folder
        kw = dict(train=False, batch_size=2, workers=0, process_index=0, process_count=1)
        return list(make_loader(Config(), source, None, **kw))

    batches = eval_batches(tmp_path / "p")
    assert [list(map(str, b["id"])) for b in batches] == [
        ["t0", "t1"],
        ["t2"],
    ] and "v" not in batches[0]
    np.testing.assert_array_equal(batches[1]["x"][0], io.read_sample(root / "test" / "t2")[0])
    from_folders = eval_batches(root / "test")
    for a, b in zip(batches, from_folders, strict=True):
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(io.DataError, match="v.npy: missing file"):
        make_loader(
            Config(),
            tmp_path / "p",
            None,
            train=True,
            batch_size=2,
            process_index=0,
            process_count=1,
        )


def test_pack_atomic_on_failure(folders, tmp_path, monkeypatch):
    root, ids = folders
    real = io.read_sample
    calls = []

    def flaky(folder, **kw):
        calls.append(folder)
        if len(calls) == 3:
            raise io.DataError(f"{folder / io.SHOT_FILES[0]}: simulated bad file")
        return real(folder, **kw)

    monkeypatch.setattr(pack.io, "read_sample", flaky)
    out = tmp_path / "store"
    with pytest.raises(io.DataError, match=f"{ids[2]}.*simulated"):
        pack.pack(root / "train", out, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the store nor its temporary folder

    def crash(folder, **kw):
        calls.append(folder)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(folder, **kw)

    monkeypatch.setattr(pack.io, "read_sample", crash)
    with pytest.raises(RuntimeError, match="disk on fire") as e:
        pack.pack(root / "train", out, progress=False)
    assert any(ids[1] in note for note in e.value.__notes__)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(pack.io, "read_sample", real)
    pack.pack(root / "train", out, ids[:2], progress=False)
    with pytest.raises(FileExistsError):
        pack.pack(root / "train", out, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_pack_rejects_bad_sample_and_float16_overflow(folders, tmp_path):
    root, _ = folders
    write_sample(tmp_path / "src" / "ok")
    write_sample(tmp_path / "src" / "big")
    shot = tmp_path / "src" / "big" / io.SHOT_FILES[1]
    a = np.load(shot)
    a[7, 7] = 10.0  # x1e4 -> 1e5, beyond float16
    np.save(shot, a)
    with pytest.raises(io.DataError, match="big.*overflows float16"):
        pack.pack(tmp_path / "src", tmp_path / "p16", dtype="float16", progress=False)
    pack.pack(tmp_path / "src", tmp_path / "p32", progress=False)  # fine in float32
    a[7, 7] = np.nan
    np.save(shot, a)
    with pytest.raises(io.DataError, match=f"{shot}: 1 NaN"):
        pack.pack(tmp_path / "src", tmp_path / "p", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p32", "src"]


def test_loader_packed_equals_folders(folders, stores):
    root, ids = folders
    cfg = Config().replace(**{"data.flip_p": 0.5, "data.prefetch": 2})
    subset = [ids[3], ids[0], ids[4], ids[1]]
    kw = dict(
        train=True, batch_size=2, seed=5, num_epochs=3, workers=0, process_index=0, process_count=1
    )
    ref = list(make_loader(cfg, root / "train", subset, **kw))
    got = list(make_loader(cfg, stores["float32"][0], subset, **kw))
    assert len(ref) == len(got) == 6
    for a, b in zip(ref, got):
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    half = list(make_loader(cfg, stores["float16"][0], subset, **kw))
    for a, b in zip(ref, half):
        assert list(a["id"]) == list(b["id"])
        np.testing.assert_array_equal(a["v"], b["v"])
        # flips too
        np.testing.assert_array_equal(a["x"].astype(np.float16).astype(np.float32), b["x"])
    with pytest.raises(io.DataError, match="2 requested id.*nope1, nope2"):
        make_loader(cfg, stores["float32"][0], ["nope1", ids[0], "nope2"], **kw)


@pytest.mark.parametrize("dtype", pack.DTYPES)
def test_stack_batch_equals_grain_batching_of_flipped(stores, dtype):
    from grain._src.python.dataset.transformations.batch import make_batch

    from fwi_jax.data.pipeline import RandomFlip

    src = pack.PackedSource(stores[dtype][0], None, raw=True)
    flips = [True, False, True]
    rng = np.random.default_rng(0)
    eager = [
        RandomFlip(float(f)).random_map(pack.PackedSource(stores[dtype][0])[i], rng)
        for i, f in enumerate(flips)
    ]
    deferred = [
        RandomFlip(float(f), defer=True).random_map(src[i], rng) for i, f in enumerate(flips)
    ]
    assert [pack.FLIP in e for e in deferred] == flips
    want, got = make_batch(eager), pack.StackBatch()(deferred)
    assert sorted(got) == sorted(want) == ["id", "v", "x"]
    for k in want:
        assert got[k].dtype == want[k].dtype
        np.testing.assert_array_equal(got[k], want[k])


def test_packed_source_pickles_without_memmap(stores):
    src = pack.PackedSource(stores["float16"][0], None)
    first = src[1]
    assert src._mm is not None
    copy = pickle.loads(pickle.dumps(src))
    assert copy._mm is None and copy.ids == src.ids
    np.testing.assert_array_equal(copy[1]["x"], first["x"])


def test_packed_store_index_checked(stores, tmp_path):
    import shutil

    store = tmp_path / "s"
    shutil.copytree(stores["float16"][0], store)
    index = json.loads((store / "index.json").read_text())
    (store / "index.json").write_text(json.dumps({**index, "version": 99}))
    with pytest.raises(io.DataError, match="format version 99"):
        pack.PackedSource(store)
    (store / "index.json").write_text(json.dumps({**index, "dtype": "float32"}))
    with pytest.raises(io.DataError, match="x.npy: float16 .* index says float32"):
        pack.PackedSource(store)[0]


def test_list_samples_folders_and_store(folders, stores, tmp_path):
    root, ids = folders
    store = stores["float32"][0]
    assert io.list_samples(store) == io.list_samples(root / "train") == sorted(ids)
    (tmp_path / "l.txt").write_text(f"{ids[3]}\n{ids[1]}\n")
    assert io.list_samples(store, tmp_path / "l.txt") == [ids[1], ids[3]]
    (tmp_path / "m.txt").write_text(f"{ids[0]}\nzz\n")
    with pytest.raises(io.DataError, match="1 listed id.*zz"):
        io.list_samples(store, tmp_path / "m.txt")


def test_packed_source_rechecks_narrower_v_range(stores):
    src = pack.PackedSource(stores["float32"][0], None, v_range=(2.0, 10.0))  # data in [1.5, 4.5]
    with pytest.raises(io.DataError, match="s0: velocities in .* outside the allowed range"):
        src[0]


def test_read_sample_fast_path_equals_checked_path(tmp_path):
    write_sample(tmp_path / "a", seed=3)
    x, v = io.read_sample(tmp_path / "a")
    x2, v2 = io._read_sample_checked(tmp_path / "a", v_range=(0.5, 10.0), require_velocity=None)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(v, v2)
    # float64 and Fortran-order files take the checked path, same result
    shot = tmp_path / "a" / io.SHOT_FILES[0]
    a = np.load(shot)
    np.save(shot, a.astype(np.float64))
    np.testing.assert_array_equal(io.read_sample(tmp_path / "a")[0], x)
    np.save(shot, np.asfortranarray(a))
    np.testing.assert_array_equal(io.read_sample(tmp_path / "a")[0], x)
    np.save(shot, a.astype(">f4"))
    np.testing.assert_array_equal(io.read_sample(tmp_path / "a")[0], x)
    a[-1, 30] = np.inf  # in the time sample that read_sample drops: still an error
    np.save(shot, a)
    with pytest.raises(io.DataError, match=f"{shot}: 0 NaN and 1 Inf"):
        io.read_sample(tmp_path / "a")


def test_pack_cli(folders, tmp_path):
    root, ids = folders
    (tmp_path / "l.txt").write_text(f"{ids[2]}\n{ids[0]}\n")
    cmd = [
        sys.executable,
        "-m",
        "fwi_jax.data",
        "pack",
        str(root / "train"),
        str(tmp_path / "p"),
        "--list",
        str(tmp_path / "l.txt"),
        "--float16",
        "--no-progress",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "packed 2 samples" in r.stdout
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    assert (index["n"], index["dtype"]) == (2, "float16")
    assert (tmp_path / "p" / "ids.txt").read_text().split() == [ids[0], ids[2]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "already exists" in r.stderr


def test_float16_batches_cast_on_device_equal_host_converted(stores):
    """data.host_dtype "store": a float16 store's batches keep x float16 (a plain copy, flips
    applied); cast to float32 on the device they equal the host-converted batches bit for bit."""
    import jax
    import jax.numpy as jnp

    from fwi_jax.data.pipeline import batch_x_dtype

    store16, store32 = stores["float16"][0], stores["float32"][0]
    cfg = Config().replace(**{"data.flip_p": 0.5})
    host = cfg.replace(**{"data.host_dtype": "float32"})
    assert Config().data.host_dtype == "store"
    assert batch_x_dtype(cfg, store16) == np.float16
    assert (
        batch_x_dtype(host, store16)
        == batch_x_dtype(cfg, store32)
        == batch_x_dtype(cfg, store16.parent)
        == np.float32
    )
    kw = dict(
        train=True, batch_size=2, seed=3, num_epochs=2, workers=0, process_index=0, process_count=1
    )
    fast = list(make_loader(cfg, store16, None, **kw))
    ref = list(make_loader(host, store16, None, **kw))
    cast = jax.jit(lambda x: x.astype(jnp.float32))  # what the model does with its input first
    assert len(fast) == len(ref) == N  # 2 epochs of N samples in batches of 2
    for a, b in zip(fast, ref):
        assert a["x"].dtype == np.float16 and b["x"].dtype == np.float32
        assert list(a["id"]) == list(b["id"])
        np.testing.assert_array_equal(a["v"], b["v"])
        on_device = np.asarray(cast(jnp.asarray(a["x"])))
        assert on_device.dtype == np.float32
        np.testing.assert_array_equal(on_device.view(np.uint32), b["x"].view(np.uint32))
    # every finite float16 (subnormals, -0 included) cast on the device is the exact float32
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    h = h[np.isfinite(h)]
    np.testing.assert_array_equal(
        np.asarray(cast(jnp.asarray(h))).view(np.uint32), h.astype(np.float32).view(np.uint32)
    )
    with pytest.raises(ValueError, match="data.host_dtype='float64'"):
        make_loader(cfg.replace(**{"data.host_dtype": "float64"}), store16, None, **kw)


def test_float16_batches_in_worker_processes(stores):
    """The same float16 batches from a grain worker process (shared memory) as from threads."""
    cfg = Config().replace(**{"data.flip_p": 0.5})
    kw = dict(train=True, batch_size=2, seed=4, num_epochs=1, process_index=0, process_count=1)
    threads = list(make_loader(cfg, stores["float16"][0], None, workers=0, **kw))
    workers = list(make_loader(cfg, stores["float16"][0], None, workers=1, **kw))
    assert len(threads) == len(workers) == 2
    for a, b in zip(threads, workers):
        assert a["x"].dtype == b["x"].dtype == np.float16
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_buffer_pool_reuses_only_unreferenced_batches(stores):
    """Thread-mode batches recycle their arrays, but never while a batch, a view of it or a JAX
    array made from it is alive; every batch still equals the one from a loader without reuse."""
    import gc

    import jax

    cfg = Config().replace(**{"data.flip_p": 0.5, "data.prefetch": 1})
    kw = dict(
        train=True, batch_size=2, seed=1, num_epochs=8, workers=0, process_index=0, process_count=1
    )
    want = [
        {k: np.array(v) for k, v in b.items()}
        for b in _batches_without_reuse(cfg, stores["float16"][0], kw)
    ]  # no reuse
    held, views, on_device, seen = [], [], [], set()
    for k, b in enumerate(make_loader(cfg, stores["float16"][0], None, **kw)):
        for key in want[k]:
            np.testing.assert_array_equal(b[key], want[k][key])
        seen.add(id(b["x"]))
        if k in (1, 2):
            held.append(b)  # the whole batch
        elif k == 3:
            views.append(b["x"][1])  # a view keeps its base
        elif k == 4:
            on_device.append(jax.device_put(b["x"]))
    assert len(seen) < len(want)  # arrays were recycled
    gc.collect()
    for k, b in zip((1, 2), held):
        np.testing.assert_array_equal(b["x"], want[k]["x"])  # never overwritten while held
    np.testing.assert_array_equal(views[0], want[3]["x"][1])
    np.testing.assert_array_equal(np.asarray(on_device[0]), want[4]["x"])


def _batches_without_reuse(cfg, root, kw):
    """The loader's batches without array reuse (grain's MapDataset read directly)."""
    from fwi_jax.data.pipeline import make_dataset

    ds = make_dataset(cfg, root, None, **{k: v for k, v in kw.items() if k != "workers"})
    return [ds[i] for i in range(len(ds))]
