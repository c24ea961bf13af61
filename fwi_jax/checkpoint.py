"""Orbax checkpoints.

Two layouts, both plain pytrees of arrays plus the resolved config as JSON:

- a *params checkpoint* (``save_params``/``load_params``): ``DIR/params`` (orbax) and
  ``DIR/config.json``; written by ``python -m fwi_jax.convert`` and by training for its best
  model, read by inference and ``--init-from``/``--load-from``;
- a *train-state checkpoint* managed during training (see ``fwi_jax.train``).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fwi_jax.config import Config, from_dict

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"


def save_params(path: str | pathlib.Path, params: Any, cfg: Config) -> pathlib.Path:
    """Write ``params`` (a pytree of float32 arrays) and ``cfg`` to ``path``, replacing it."""
    path = pathlib.Path(path).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(cfg.to_json())
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / PARAMS_DIR, jax.device_get(params), force=True)
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
