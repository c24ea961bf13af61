"""The reference's train/validation split (reference §1) and plain-text id lists.

Reference procedure: ``KFold(n_splits=5, shuffle=True, random_state=123)`` over the ids of the
first release, fold 0 is validation, and every id of the other (extended) release is added to
training. Ids are sorted first so the split does not depend on directory order.

Samples made by mixing a dataset's velocity models (``fwi_jax.synth.mix``, ids starting with
``TRAINING_ONLY_PREFIX``) are training only: they are never drawn into a validation fold, even
when they sit in the first release's folder, and ``check_no_training_only`` refuses a
validation list that names one.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Sequence

import numpy as np

from fwi_jax.storage import write_atomic

N_FOLDS = 5
SEED = 123
TRAINING_ONLY_PREFIX = "mix_"


def is_training_only(sample_id: str) -> bool:
    return sample_id.startswith(TRAINING_ONLY_PREFIX)


def check_no_training_only(val_ids: Iterable[str], where: str = "validation list") -> None:
    """Raise ValueError if a validation list names a training-only (mixed) sample."""
    bad = [i for i in val_ids if is_training_only(i)]
    if bad:
        raise ValueError(
            f"{where}: {len(bad)} mixed sample(s) (training only) in validation, "
            f"e.g. {', '.join(bad[:5])}"
        )


def kfold_indices(n: int, n_splits: int = N_FOLDS, seed: int = SEED) -> list[np.ndarray]:
    """Validation indices of each fold, exactly as sklearn's
    ``KFold(n_splits, shuffle=True, random_state=seed).split(range(n))`` gives them.

    Written by hand (sklearn is not a runtime dependency) from sklearn's documented algorithm:
    shuffle arange(n) in place with ``np.random.RandomState(seed)``, then consecutive folds of
    size n // n_splits, the first n % n_splits folds one larger, each returned sorted as sklearn
    does. tests/test_data_split.py checks
    equality against sklearn itself."""
    if not 2 <= n_splits <= n:
        raise ValueError(f"cannot make {n_splits} folds of {n} ids")
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_splits, n // n_splits, dtype=int)
    sizes[: n % n_splits] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.sort(order[bounds[k] : bounds[k + 1]]) for k in range(n_splits)]


def reference_split(
    first: Iterable[str],
    extra: Iterable[str] = (),
    fold: int = 0,
    n_splits: int = N_FOLDS,
    seed: int = SEED,
) -> tuple[list[str], list[str]]:
    """(train ids, val ids): fold ``fold`` of the sorted first-release ids is validation; the other
    folds plus every extra id are training, and so are training-only (mixed) ids wherever they
    are listed. Ids appearing in both releases are an error."""
    first, extra = set(first), set(extra)
    mixed = {i for i in first if is_training_only(i)}
    first = sorted(first - mixed)
    extra = sorted(extra | mixed)
    both = set(first) & set(extra)
    if both:
        raise ValueError(
            f"{len(both)} id(s) are in both releases, e.g. {', '.join(sorted(both)[:5])}"
        )
    folds = kfold_indices(len(first), n_splits, seed)
    val_idx = folds[fold]
    val_set = set(val_idx.tolist())
    train = [first[i] for i in range(len(first)) if i not in val_set] + extra
    val = [first[i] for i in val_idx.tolist()]
    return sorted(train), val


def read_id_list(path) -> list[str]:
    """Ids from a text file, one per line; blank lines and surrounding whitespace ignored."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: id list does not exist")
    ids = [line.strip() for line in path.read_text().splitlines()]
    ids = [i for i in ids if i]
    dup = len(ids) - len(set(ids))
    if dup:
        raise ValueError(f"{path}: {dup} duplicate id(s)")
    return ids


def write_id_list(path, ids: Sequence[str]) -> None:
    """Write ids one per line (atomically: temporary file in the same folder, then rename)."""
    write_atomic(path, "".join(f"{i}\n" for i in ids))
