"""PyTorch weights -> our params.

Two sources:
- the reference solution's ``state_dict`` (keys ``backbone.*`` and ``head.*``, optionally prefixed
  ``_orig_mod.`` by ``torch.compile``): every parameter is converted, the model runs as trained;
- the first place's ``state_dict`` (the same keys plus ``channel_fusion_mha.*``, its attention
  fusion; ``geometry.head=token_linear``): converted key by key as well;
- a timm EVA02 checkpoint (``patch_embed.*``, ``blocks.*``, ...): the backbone is converted for
  initialising training, the 3-channel patch embedding summed to 1 channel as timm does for
  ``in_chans=1``, the pos-embed grid resampled to the config's token grid as timm's
  ``resample_abs_pos_embed`` does (bicubic, antialias, cls kept); the head keeps its random init.

Files: ``.safetensors`` (read with safetensors' NumPy loader) or ``.pth``/``.pt`` through
``torch.load(weights_only=True)``. Never unpickles arbitrary code.

CLI: ``python -m fwi_jax.convert IN --config NAME --out DIR`` writes a params checkpoint.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fwi_jax import cli
from fwi_jax.config import Config, ConfigError, add_override_argument, load_config
from fwi_jax.model import abstract_params, create_model

# timm keys present in checkpoints that the split model never uses (reference §3)
UNUSED_PREFIXES = ("fc_norm.", "head.", "norm.", "rope.")
UNUSED_SUFFIXES = ("attn.k_bias", "relative_position_index")


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the config; the message lists every offending key."""


def load_torch_file(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A flat {key: float32 array} from ``.safetensors`` or a weights-only ``.pth``/``.pt``."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        state = load_file(str(path))
    else:
        try:
            import torch
        except ImportError as e:  # torch is only in the test extra
            raise ImportError(
                f"reading {path} needs PyTorch (pip install torch), or convert it to .safetensors"
            ) from e
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a weights-only PyTorch checkpoint ({e})") from e
        for wrapper in ("state_dict", "model", "module", "state_dict_ema"):
            if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
                state = state[wrapper]
                break
        state = {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}
    return {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}


def resample_pos_embed(
    pos_embed: np.ndarray, new_grid: tuple[int, int], n_prefix: int = 1
) -> np.ndarray:
    """(1, n_prefix + h*w, D) -> (1, n_prefix + H*W, D): bicubic with antialias on the grid part
    (PyTorch's antialiased bicubic is Keys' cubic with a = -0.5 and half-pixel centres, which
    ``jax.image.resize(method="cubic", antialias=True)`` implements); prefix tokens kept."""
    prefix, grid = pos_embed[:, :n_prefix], pos_embed[:, n_prefix:]
    n, d = grid.shape[1], grid.shape[2]
    if n == new_grid[0] * new_grid[1]:
        return pos_embed  # already at the config's grid (e.g. the reference's own state_dicts)
    side = int(round(np.sqrt(n)))
    if side * side != n:
        raise CheckpointMismatch(f"pos_embed has {n} grid tokens, not a square grid")
    img = jnp.asarray(grid.reshape(side, side, d))
    out = jax.image.resize(img, (*new_grid, d), method="cubic", antialias=True)
    return np.concatenate([prefix, np.asarray(out, np.float32).reshape(1, -1, d)], axis=1)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        out.update(_flatten(v, path) if isinstance(v, Mapping) else {path: v})
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _torch_to_ours(key: str, value: np.ndarray, cfg: Config) -> tuple[str, np.ndarray] | None:
    """One backbone key (no 'backbone.' prefix) -> (our path, array), or None if unused."""
    if key.startswith(UNUSED_PREFIXES) or key.endswith(UNUSED_SUFFIXES):
        return None
    if key == "patch_embed.proj.weight":  # (D, C, p, p) conv -> (p*p, D) linear
        if value.shape[1] != 1:
            value = value.sum(axis=1, keepdims=True)  # timm's adapt_input_conv for in_chans=1
        return "patch_embed/proj/kernel", value.reshape(value.shape[0], -1).T
    if key == "patch_embed.proj.bias":
        return "patch_embed/proj/bias", value
    if key == "cls_token":
        return "cls_token", value
    if key == "pos_embed":
        try:
            return "pos_embed", resample_pos_embed(value, cfg.geometry.grid)
        except CheckpointMismatch:  # neither the config's grid nor a square pretrain grid
            return "pos_embed", value  # reported with the other mis-shaped keys
    parts = key.split(".")
    if parts[0] != "blocks":
        return key.replace(".", "/"), value  # reported as unexpected by the caller
    path = "/".join(parts[:-1])
    leaf = parts[-1]
    if leaf in ("q_bias", "v_bias"):
        return f"{path}/{leaf}", value
    module = parts[-2]
    if module.startswith("norm"):
        return f"{path}/{'scale' if leaf == 'weight' else 'bias'}", value
    if leaf == "weight":
        return f"{path}/kernel", value.T
    return f"{path}/{leaf}", value


def _fusion_to_ours(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """A ``channel_fusion_mha.*`` key of the first place's models -> (our path, array):
    ``nn.MultiheadAttention``'s ``in_proj_weight``/``in_proj_bias`` -> ``in_proj/kernel|bias``,
    Linear weights transposed, LayerNorm weight -> scale; names otherwise kept."""
    *parents, leaf = key.split(".")
    if leaf.startswith("in_proj_"):
        parents, leaf = [*parents, "in_proj"], leaf.removeprefix("in_proj_")
    path = "/".join(parents)
    if leaf == "weight" and parents[-1].startswith("norm"):
        return f"{path}/scale", value
    if leaf == "weight":
        return f"{path}/kernel", value.T
    return f"{path}/{leaf}", value


def convert_state_dict(
    state: Mapping[str, np.ndarray], cfg: Config, seed: int = 0
) -> tuple[dict, list[str]]:
    """Torch state dict -> (params, skipped keys). Reference dicts convert completely; timm
    backbones keep the random head of ``create_model(cfg, seed)``. Raises CheckpointMismatch
    naming every missing, unexpected or mis-shaped key."""
    state = {k.removeprefix("_orig_mod."): np.asarray(v, np.float32) for k, v in state.items()}
    is_reference = any(k.startswith("backbone.") for k in state)
    expected = {p: tuple(s.shape) for p, s in _flatten(abstract_params(cfg)).items()}
    converted, skipped, unexpected, misshaped = {}, [], [], []
    for key, value in state.items():
        if is_reference:
            if key.startswith("head."):
                path, arr = f"head/{'kernel' if key.endswith('weight') else 'bias'}", value
                arr = arr.T if key.endswith("weight") else arr
                converted[path] = arr
                continue
            if key.startswith("channel_fusion_mha."):  # the first place's attention fusion
                path, arr = _fusion_to_ours(key, value)
                if path not in expected:
                    unexpected.append(key)
                elif tuple(arr.shape) != expected[path]:
                    misshaped.append(
                        f"{key}: checkpoint {tuple(value.shape)}, config expects {expected[path]}"
                    )
                else:
                    converted[path] = arr
                continue
            if not key.startswith("backbone."):
                unexpected.append(key)
                continue
            key = key.removeprefix("backbone.")
        mapped = _torch_to_ours(key, value, cfg)
        if mapped is None:
            skipped.append(key)
            continue
        path, arr = mapped
        if path not in expected:
            unexpected.append(key)
        elif tuple(arr.shape) != expected[path]:
            misshaped.append(
                f"{key}: checkpoint {tuple(value.shape)} -> {tuple(arr.shape)}, config expects "
                f"{expected[path]}"
            )
        else:
            converted[path] = arr
    # a timm backbone: the head (and a depth prior) are new; any checkpoint: an error head
    # (model.error_head) is new, the PyTorch models have none
    fresh = ("head/kernel", "head/bias", "depth_prior") if not is_reference else ()
    fresh += ("error_head/kernel", "error_head/bias", "error_prior")
    if any(path in expected for path in fresh):
        init = _flatten(create_model(cfg, seed)[1])
        for path in fresh:
            if path in init:
                converted[path] = np.asarray(init[path])
    missing = sorted(set(expected) - set(converted))
    if missing or unexpected or misshaped:
        lines = [
            f"checkpoint does not fit config {cfg.name!r} (model.size={cfg.model.size}, "
            f"geometry.grid={cfg.geometry.grid}); pick the config the weights were trained with "
            f"(--config) or check the file."
        ]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  wrong shape: {k}" for k in misshaped]
        raise CheckpointMismatch("\n".join(lines))
    return _unflatten(converted), skipped


def convert_file(path: str | pathlib.Path, cfg: Config, seed: int = 0) -> dict:
    """Read and convert a PyTorch checkpoint file for ``cfg``."""
    try:
        params, _ = convert_state_dict(load_torch_file(path), cfg, seed)
    except CheckpointMismatch as e:
        raise CheckpointMismatch(f"{path}: {e}") from None
    return params


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fwi_jax.convert", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "input", help="timm EVA02 checkpoint or reference state_dict (.pth/.pt/.safetensors)"
    )
    ap.add_argument("--config", required=True, help="config name (tiny_s8, base_s6, ...) or path")
    ap.add_argument("--out", required=True, help="output params checkpoint directory")
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of the head's init for timm backbones"
    )
    add_override_argument(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fwi_jax.checkpoint import save_params

    try:
        cfg = load_config(args.config, args.set)
        state = load_torch_file(args.input)
        params, skipped = convert_state_dict(state, cfg, args.seed)
    except (ConfigError, CheckpointMismatch, FileNotFoundError, ValueError, ImportError) as e:
        return cli.fail(e)
    if skipped:
        print(f"skipped {len(skipped)} unused keys: {', '.join(sorted(skipped))}")
    out = save_params(args.out, params, cfg)
    print(
        f"wrote {out} ({sum(np.size(v) for v in jax.tree.leaves(params)):,} parameters, config "
        f"{cfg.name})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
