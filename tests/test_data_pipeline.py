"""grain pipeline: determinism across worker counts, exact resume, flip, sharding, eval order."""

import numpy as np
import pytest

from fwi_jax import preprocess
from fwi_jax.config import Config
from fwi_jax.data.io import SHOT_FILES, VELOCITY_FILE, read_sample
from fwi_jax.data.pipeline import RandomFlip, global_batch_ids, host_batches, make_loader

N = 7


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """N real-shaped samples; each velocity model differs along x so a flip is visible."""
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    ids = [f"s{i:02d}" for i in range(N)]
    for k, i in enumerate(ids):
        (root / i).mkdir()
        for name in SHOT_FILES:
            np.save(root / i / name, rng.standard_normal((10001, 31), dtype=np.float32))
        vp = (
            1.5
            + 0.1 * k
            + np.linspace(0, 1, 300, dtype=np.float32)[:, None]
            + np.zeros((300, 1259), np.float32)
        )
        np.save(root / i / VELOCITY_FILE, vp)
    return root, ids


def cfg(flip_p=0.5):
    return Config().replace(**{"data.flip_p": flip_p, "data.prefetch": 2})


def loader(root, ids, *, flip_p=0.5, workers=0, process_index=0, process_count=1, **kw):
    """`make_loader` under ``cfg(flip_p)``, as one host reading in threads unless told."""
    kw |= dict(workers=workers, process_index=process_index, process_count=process_count)
    return make_loader(cfg(flip_p), root, ids, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_train_batches_shapes_and_epochs(dataset):
    root, ids = dataset
    batches = list(loader(root, ids, train=True, batch_size=2, seed=3, num_epochs=2))
    assert len(batches) == (2 * N) // 2  # 14 samples, none left over
    b = batches[0]
    assert b["x"].shape == (2, 6, 10000, 31) and b["x"].dtype == np.float32
    assert b["v"].shape == (2, 1259, 300) and b["v"].dtype == np.float32
    seen = [str(i) for b in batches for i in b["id"]]
    assert sorted(seen[:N]) == ids and sorted(seen[N:]) == ids  # each epoch a permutation
    assert seen[:N] != seen[N:]  # reshuffled each epoch (fixed seed, so this is deterministic)
    assert seen[:N] != ids


def test_flip_consistent_with_read_sample(dataset):
    root, ids = dataset
    batches = list(loader(root, ids, flip_p=0.5, train=True, batch_size=1, seed=0, num_epochs=4))
    flipped = 0
    for b in batches:
        x, v = read_sample(root / str(b["id"][0]))
        if np.array_equal(b["v"][0], v):
            np.testing.assert_array_equal(b["x"][0], x)
        else:
            fx, fv = preprocess.flip(x, v)
            np.testing.assert_array_equal(b["v"][0], fv)  # velocity flipped together with x
            np.testing.assert_array_equal(b["x"][0], fx)
            assert not b["x"][0, 2].any()  # the zero channel moved from 3 to 2
            flipped += 1
    # 28 draws with p = 0.5: P(all or none flipped) ~ 1e-8, so both kinds must occur
    assert 0 < flipped < len(batches)


def test_flip_twice_identity(dataset):
    root, ids = dataset
    x, v = read_sample(root / ids[0])
    e = {"x": x, "v": v, "id": np.asarray(ids[0])}
    always = RandomFlip(1.0)
    rng = np.random.default_rng(0)
    once = always.random_map(e, rng)
    assert not np.array_equal(once["x"], x) and not np.array_equal(once["v"], v)
    twice = always.random_map(once, rng)
    assert_same([twice], [e])
    assert RandomFlip(0.0).random_map(e, rng) is e


def _close(it):
    if hasattr(it, "close"):  # grain asks that multiprocess iterators be closed explicitly
        it.close()


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.full)])
def test_deterministic_and_resumable_whatever_workers(dataset, workers):
    root, ids = dataset
    kw = dict(train=True, batch_size=2, seed=7, num_epochs=None)
    ref = take(iter(loader(root, ids, **kw)), 6)
    it = iter(loader(root, ids, workers=workers, **kw))
    try:
        first = take(it, 3)
        state = it.get_state()
    finally:
        _close(it)
    it = iter(loader(root, ids, workers=workers, **kw))
    try:
        it.set_state(state)
        rest = take(it, 3)
    finally:
        _close(it)
    assert_same(ref, first + rest)
    other = take(iter(loader(root, ids, **{**kw, "seed": 8})), 6)
    assert [list(b["id"]) for b in other] != [list(b["id"]) for b in ref]


def test_resume_exact(dataset):
    root, ids = dataset
    once = loader(root, ids, train=True, batch_size=2, seed=1)
    uninterrupted = take(iter(once), 8)
    it = iter(once)
    take(it, 5)
    state = it.get_state()
    fresh = iter(loader(root, ids, train=True, batch_size=2, seed=1))
    fresh.set_state(state)
    assert_same(take(fresh, 3), uninterrupted[5:])


def test_eval_order_remainder_and_sharding(dataset):
    root, ids = dataset
    batches = list(loader(root, ids, train=False, batch_size=3))
    assert [len(b["id"]) for b in batches] == [3, 3, 1]  # remainder kept in evaluation
    assert [str(i) for b in batches for i in b["id"]] == ids  # no shuffle, no flip
    x, v = read_sample(root / ids[4])
    np.testing.assert_array_equal(batches[1]["x"][1], x)
    np.testing.assert_array_equal(batches[1]["v"][1], v)
    shards = [
        [
            str(i)
            for b in loader(root, ids, train=False, batch_size=2, process_index=p, process_count=2)
            for i in b["id"]
        ]
        for p in range(2)
    ]
    assert shards == [ids[0::2], ids[1::2]]  # disjoint, complete, each host reads only its share
    with pytest.raises(ValueError, match="multiple of the host count"):
        make_loader(cfg(), root, ids, train=True, batch_size=3, process_index=0, process_count=2)


def test_epoch_shuffle_permutes_each_epoch_deterministically():
    """EpochShuffle: every epoch of a repeat is a permutation, a different one per epoch and per
    seed, the same from a fresh or pickled copy, read in any order (threads, resume)."""
    import pickle

    import grain

    from fwi_jax.data.pipeline import EpochShuffle

    n = 50
    src = grain.MapDataset.range(n)
    ds = EpochShuffle(src, seed=7).repeat(4)
    seen = [ds[i] for i in range(4 * n)]
    epochs = [seen[e * n : (e + 1) * n] for e in range(4)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4 and epochs[0] != list(range(n))
    assert [ds[i] for i in reversed(range(4 * n))] == seen[::-1]  # any access order, cache evicted
    assert [pickle.loads(pickle.dumps(ds))[i] for i in range(4 * n)] == seen
    assert [EpochShuffle(src, seed=8).repeat(4)[i] for i in range(4 * n)] != seen
    assert list(EpochShuffle(src, seed=7)) == epochs[0] and len(EpochShuffle(src, seed=7)) == n


def test_host_batches_pad_every_host_to_whole_global_batches(dataset):
    """5 samples, global batch 2 over 2 hosts: host 0 reads s00, s02, s04 and host 1 s01, s03,
    then a batch of padding only; padded rows are x 0, v 1, id "" and mask 0."""
    root, ids = dataset
    ids = ids[:5]
    per_host = [
        list(
            host_batches(
                cfg(), root, ids, batch_size=2, velocity=True, process_index=p, process_count=2
            )
        )
        for p in (0, 1)
    ]
    assert [len(h) for h in per_host] == [3, 3]
    for k in range(3):
        got = [str(i) for p in (0, 1) for i in per_host[p][k]["id"]]
        assert got == [i or "" for i in global_batch_ids(ids, k, 1, 2)]
    pad = per_host[1][2]
    assert pad["mask"].tolist() == [0.0] and pad["id"].tolist() == [""]
    assert not pad["x"].any() and (pad["v"] == 1).all() and pad["x"].shape == (1, 6, 10000, 31)
    real = per_host[0][2]
    assert real["mask"].tolist() == [1.0]
    np.testing.assert_array_equal(real["x"][0], read_sample(root / "s04")[0])
    # one host, batch 2: the last batch is half padding; without velocity there is no "v"
    one = list(
        host_batches(
            cfg(), root, ids, batch_size=2, velocity=False, process_index=0, process_count=1
        )
    )
    assert [b["mask"].tolist() for b in one] == [[1, 1], [1, 1], [1, 0]]
    assert [b["id"].tolist() for b in one][-1] == ["s04", ""] and "v" not in one[0]
    assert not one[-1]["x"][1].any()
