"""The reference k-fold split (reference §1) against sklearn, and id-list round trips."""

import numpy as np
import pytest
from sklearn.model_selection import KFold

from fwi_jax.data.split import kfold_indices, read_id_list, reference_split, write_id_list


@pytest.mark.parametrize("n", [5, 7, 2000, 2003])
def test_kfold_matches_sklearn(n):
    ref = [val for _, val in KFold(n_splits=5, shuffle=True, random_state=123).split(np.arange(n))]
    ours = kfold_indices(n)
    assert len(ours) == 5
    for a, b in zip(ref, ours):
        np.testing.assert_array_equal(a, b)


def test_reference_split_sizes_disjoint_complete_deterministic():
    first = [f"f{i:05d}" for i in range(2000)]
    extra = [f"e{i:05d}" for i in range(2999)]
    rng = np.random.default_rng(0)
    shuffled = list(rng.permutation(first))  # directory order must not matter
    train, val = reference_split(shuffled, extra)
    assert (len(train), len(val)) == (4599, 400)
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(first) | set(extra)
    assert set(extra) <= set(train)
    # fold 0 of sklearn over the sorted first release is the validation set
    _, val_idx = next(KFold(5, shuffle=True, random_state=123).split(np.arange(2000)))
    assert val == [sorted(first)[i] for i in val_idx]
    assert reference_split(first, list(reversed(extra))) == (train, val)


def test_reference_split_rejects_overlap():
    with pytest.raises(ValueError, match="both releases"):
        reference_split(["a", "b", "c", "d", "e"], ["c"])


def test_id_list_roundtrip(tmp_path):
    ids = ["b_1", "a_2", "c_3"]
    write_id_list(tmp_path / "x.txt", ids)
    assert (tmp_path / "x.txt").read_text() == "b_1\na_2\nc_3\n"
    assert read_id_list(tmp_path / "x.txt") == ids
    (tmp_path / "y.txt").write_text("a\n\n  b \n")
    assert read_id_list(tmp_path / "y.txt") == ["a", "b"]
    (tmp_path / "z.txt").write_text("a\na\n")
    with pytest.raises(ValueError, match="duplicate"):
        read_id_list(tmp_path / "z.txt")


def test_split_cli(tmp_path):
    import subprocess
    import sys

    first = [f"f{i:04d}" for i in range(20)]
    for i in first:
        (tmp_path / "first" / i).mkdir(parents=True)
    write_id_list(tmp_path / "extra.txt", ["e2", "e1"])
    cmd = [
        sys.executable,
        "-m",
        "fwi_jax.data",
        "split",
        "--first",
        str(tmp_path / "first"),
        "--extra",
        str(tmp_path / "extra.txt"),
        "--out",
        str(tmp_path / "out"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    train, val = reference_split(first, ["e1", "e2"])
    assert read_id_list(tmp_path / "out" / "train_f0.txt") == train
    assert read_id_list(tmp_path / "out" / "val_f0.txt") == val
    assert len(val) == 4 and len(train) == 18
    # the lists written are accepted back as --first input, giving the same split
    write_id_list(tmp_path / "first.txt", list(reversed(first)))
    r = subprocess.run(
        cmd[:5] + [str(tmp_path / "first.txt")] + cmd[6:-1] + [str(tmp_path / "out2")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert read_id_list(tmp_path / "out2" / "val_f0.txt") == val
