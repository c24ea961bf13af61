"""Orbax checkpoints.

Two layouts, both plain pytrees of arrays plus the resolved config as JSON:

- a *params checkpoint* (``save_params``/``load_params``): ``DIR/params`` (orbax) and
  ``DIR/config.json``; written by ``python -m fwi_jax.convert`` and by training for its best
  model, read by inference and ``--init-from``/``--load-from``;
- *train-state checkpoints* (``TrainCheckpoints``): everything a run needs to continue exactly
  (params, optimiser state, EMA, loss scale, step, RNG in one pytree; the grain iterator state and
  run metadata as JSON), one folder per step under ``WORKDIR/checkpoints``, saved asynchronously by
  an orbax ``CheckpointManager`` that keeps the newest N. Orbax writes each step under a
  temporary name and renames it when complete, so a checkpoint half-written by a crash is never
  listed, let alone loaded.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fwi_jax.config import Config, from_dict

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"


def save_params(path: str | pathlib.Path, params: Any, cfg: Config) -> pathlib.Path:
    """Write ``params`` (a pytree of float32 arrays) and ``cfg`` to ``path``, replacing it
    atomically: written beside it under a temporary name, then swapped in."""
    path = pathlib.Path(path).expanduser().resolve()
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    for p in (tmp, old):
        shutil.rmtree(p, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG_FILE).write_text(cfg.to_json())
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp / PARAMS_DIR, jax.device_get(params))
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def is_params_checkpoint(path: str | pathlib.Path) -> bool:
    path = pathlib.Path(path).expanduser()
    return (path / PARAMS_DIR).is_dir() and (path / CONFIG_FILE).is_file()


def load_params(path: str | pathlib.Path) -> tuple[Config, Any]:
    """Read a params checkpoint: (config, params as NumPy arrays in a nested dict)."""
    path = pathlib.Path(path).expanduser().resolve()
    if not is_params_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a params checkpoint: expected {path / PARAMS_DIR}/ and {path / CONFIG_FILE}"
        )
    cfg = from_dict(json.loads((path / CONFIG_FILE).read_text()))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / PARAMS_DIR)
    params = jax.tree.map(np.asarray, params)
    return cfg, params


class TrainCheckpoints:
    """Train-state checkpoints of one run: ``DIR/<step>/{state, loader, meta}``.

    ``state`` is the train-state pytree (restored onto the shardings of the target you pass),
    ``loader`` the grain iterator state, ``meta`` a JSON dict (epoch, best MAPE, config ...)."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 2, asynchronous: bool = True):
        self.directory = pathlib.Path(directory).expanduser().resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True,
                                               enable_async_checkpointing=asynchronous)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "loader", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, loader_state: dict, meta: dict) -> None:
        """Start saving (returns once the arrays are copied off the devices)."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            loader=ocp.args.JsonSave(loader_state),
            meta=ocp.args.JsonSave(meta),
        ))

    def restore(self, step: int, target: Any) -> tuple[Any, dict, dict]:
        """(state, loader_state, meta) of ``step``; ``target`` gives the structure, shapes and
        shardings (the freshly initialised state, or ``jax.eval_shape`` of it)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            loader=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ))
        return out.state, out.loader, out.meta

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
