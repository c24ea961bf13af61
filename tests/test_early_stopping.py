"""``train.early_stop_patience``: the first place's early stopping (their training script's
EarlyStopping with patience 3 and delta 0: a validation MAPE above the best so far counts, a tie
does not, the run ends when the count reaches the patience) in `fwi_jax.train.train`, with the
count carried through a resume.

Validation results are scripted (``evaluate`` replaced by a list), so the rule is tested, not
what a tiny model happens to learn; the run itself is test_train.py's small network and data."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_train import dataset, params_of, small_cfg  # noqa: F401  (dataset: a fixture)

from fwi_jax import train as T

# one validation per epoch of 4 steps: best 0.5, a tie (count 0), above (1), above (2): stop
SCRIPT = [0.5, 0.5, 0.6, 0.7, 0.3]
PATIENCE, STOP_STEP = 2, 16  # stops after epoch 4 of 5


def scripted(monkeypatch, start: int = 0):
    calls = [start]

    def evaluate(*args, **kwargs):  # (MAPE, first sample's truth, its prediction)
        calls[0] += 1
        return SCRIPT[calls[0] - 1], np.full((4, 3), 2.0), np.full((4, 3), 2.5)

    monkeypatch.setattr(T, "evaluate", evaluate)


def cfg_of(dataset):  # noqa: F811
    return small_cfg(dataset, "train.epochs=5", f"train.early_stop_patience={PATIENCE}")


def test_early_stop_ends_the_run_and_resume_keeps_the_count(dataset, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Uninterrupted: stops after step 16 of 20 with a line saying so, best/ and final/ written.
    Interrupted after step 13 (count 1 saved) and resumed: stops at the same step with the same
    final weights, bit for bit (a count restarted at 0 would run to step 20). A stopped run
    resumes as finished."""
    scripted(monkeypatch)
    summary = T.train(cfg_of(dataset), tmp_path / "a", progress=False)
    assert (summary["steps"], summary["early_stopped"]) == (STOP_STEP, True)
    assert summary["best_mape"] == 0.5
    assert "early stop after step 16 (epoch 4) of 20" in capsys.readouterr().err
    assert (tmp_path / "a" / "best").is_dir() and (tmp_path / "a" / "final").is_dir()

    scripted(monkeypatch)

    def interrupt(step, batch):
        if step == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(cfg_of(dataset), tmp_path / "b", progress=False, on_batch=interrupt)
    scripted(monkeypatch, start=3)  # epochs 1-3 validated before the interruption
    resumed = T.train(cfg_of(dataset), tmp_path / "b", resume=True, progress=False)
    assert (resumed["steps"], resumed["early_stopped"]) == (STOP_STEP, True)
    for name in ("final", "best"):
        a, b = params_of(tmp_path / "a", name), params_of(tmp_path / "b", name)
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), (
            name
        )
    again = T.train(cfg_of(dataset), tmp_path / "b", resume=True, progress=False)
    assert (again["steps"], again["early_stopped"]) == (STOP_STEP, True)
