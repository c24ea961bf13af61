"""Ensemble members and initial weights: what a user names, and loading it.

A member is a params checkpoint (``fwi_jax.checkpoint.save_params``; carries its config), a
training run directory (its ``best/`` params: the EMA weights once the EMA was active), or a
PyTorch ``state_dict`` of the reference solution (``.pth``/``.pt`` read with
``torch.load(weights_only=True)``, or ``.safetensors``) converted for a config named with it.
Inference loads members with `load_member`; training's ``--init-from``/``--load-from`` read
weights with `read_weights`, so both accept the same files.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

from fwi_jax.checkpoint import is_params_checkpoint, load_params
from fwi_jax.config import Config, ConfigError, apply_overrides, load_config

TORCH_SUFFIXES = (".pth", ".pt", ".safetensors")
ENSEMBLE_KEYS = ("checkpoint", "config", "weight")


class MemberError(ValueError):
    """A member, ensemble file or weights file that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class MemberSpec:
    """One ensemble member as the user names it."""

    checkpoint: str
    config: str | None = None  # config of members that carry none (PyTorch state_dicts)
    weight: float = 1.0


@dataclasses.dataclass
class Member:
    cfg: Config
    params: Any  # nested dict of float32 NumPy arrays
    weight: float
    source: str


def network_key(cfg: Config) -> str:
    """Configs with equal keys build the same network (geometry + model); training settings
    differ freely."""
    return json.dumps(
        {"geometry": dataclasses.asdict(cfg.geometry), "model": dataclasses.asdict(cfg.model)},
        sort_keys=True,
    )


def read_ensemble_file(path: str | pathlib.Path) -> list[MemberSpec]:
    """JSON list of {"checkpoint", "config" (optional), "weight" (optional, > 0)} -> specs.
    Relative checkpoint paths are resolved against the ensemble file's folder."""
    path = pathlib.Path(path).expanduser()
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        raise MemberError(f"ensemble file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise MemberError(f"ensemble file {path}: not valid JSON ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise MemberError(f"ensemble file {path}: expected a non-empty JSON list of members")
    specs = []
    for i, entry in enumerate(entries):
        where = f"ensemble file {path}, member {i}"
        if not isinstance(entry, dict) or "checkpoint" not in entry:
            raise MemberError(f"{where}: expected an object with a 'checkpoint' key, got {entry!r}")
        unknown = set(entry) - set(ENSEMBLE_KEYS)
        if unknown:
            raise MemberError(
                f"{where}: unknown keys {sorted(unknown)} (allowed: {', '.join(ENSEMBLE_KEYS)})"
            )
        ckpt = pathlib.Path(entry["checkpoint"]).expanduser()
        if not ckpt.is_absolute():
            ckpt = path.parent / ckpt
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
            raise MemberError(f"{where}: weight must be a positive number, got {weight!r}")
        specs.append(MemberSpec(str(ckpt), entry.get("config"), float(weight)))
    return specs


def is_torch_file(path: pathlib.Path) -> bool:
    return path.is_file() and path.suffix in TORCH_SUFFIXES


def resolve_params_dir(path: pathlib.Path) -> pathlib.Path:
    """A params checkpoint as given, or the best params of a training run directory."""
    if is_params_checkpoint(path):
        return path
    # a training run (fwi_jax.train) keeps its best model as a params checkpoint under best/
    # (EMA weights once the EMA is active, as the reference validated and saved them)
    if is_params_checkpoint(path / "best"):
        return path / "best"
    raise MemberError(
        f"{path}: not a params checkpoint (no params/ + config.json), not a training run with a "
        f"best/ params checkpoint, and not a PyTorch file ({', '.join(TORCH_SUFFIXES)})"
    )


def read_weights(
    path: str | pathlib.Path, cfg: Config | None, seed: int = 0
) -> tuple[Config | None, Any]:
    """(saved config, params) of a params checkpoint or training run; (None, params converted for
    ``cfg``) of a PyTorch file, whose keys the reference lacks are initialised from ``seed``."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise MemberError(f"{path} does not exist")
    try:
        if is_torch_file(path):
            if cfg is None:
                raise MemberError(
                    f"{path} is a PyTorch state_dict and carries no config: name it "
                    f"with --config (or 'config' in the ensemble file)"
                )
            from fwi_jax.convert import convert_file  # needs torch only for .pth/.pt

            return None, convert_file(path, cfg, seed=seed)
        return load_params(resolve_params_dir(path))
    except MemberError:
        raise
    except (ConfigError, FileNotFoundError) as e:
        raise MemberError(f"{path}: {e}") from None
    except ValueError as e:  # convert.CheckpointMismatch (names the file) and unreadable files
        raise MemberError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None


def load_member(
    spec: MemberSpec, default_config: str | None = None, overrides: Sequence[str] = ()
) -> Member:
    """Load one member; PyTorch state_dicts are converted for ``spec.config or default_config``,
    a config named in ``spec`` for a params checkpoint must build the network it saved.
    ``overrides`` (``model.dtype=bfloat16`` ...) apply to every member's config."""
    path = pathlib.Path(spec.checkpoint).expanduser()
    config_name = spec.config or (default_config if is_torch_file(path) else None)
    try:
        named = load_config(config_name) if config_name is not None else None
    except ConfigError as e:
        raise MemberError(f"member {path}: {e}") from None
    try:
        saved, params = read_weights(path, named)
    except MemberError as e:
        raise MemberError(f"member {e}") from None
    cfg = saved if saved is not None else named
    if saved is not None and named is not None and network_key(named) != network_key(saved):
        raise MemberError(
            f"member {path}: its saved config {saved.name!r} builds a different "
            f"network than the config {spec.config!r} named for it"
        )
    try:
        cfg = apply_overrides(cfg, list(overrides))
    except ConfigError as e:
        raise MemberError(f"member {path}: {e}") from None
    return Member(cfg=cfg, params=params, weight=spec.weight, source=str(path))
