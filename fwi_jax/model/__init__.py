"""The model as plain pytrees: ``create_model`` -> (graphdef, params); ``apply_model`` is pure.

``params`` is a nested dict with string keys and float32 leaves (timm-like paths such as
``blocks/3/attn/qkv/kernel``), so orbax saves it unchanged and ensembles stack it with
``jax.tree.map(np.stack, *members)``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from fwi_jax.config import Config
from fwi_jax.model.fwi import FWIModel, constant_once, model_size

Params = dict[str, Any]


def _str_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def create_model(
    cfg: Config, seed: int = 0, *, platform: str | None = None
) -> tuple[nnx.GraphDef, Params]:
    """Randomly initialised model for ``cfg``: (graphdef, params). ``platform``: the platform
    its programs are compiled for (cpu, cuda, rocm, tpu; None: this process's default backend),
    which decides ``model.attention=auto`` and the dense layers' backward pass
    (`fwi_jax.model.target`)."""
    model = FWIModel(cfg, rngs=nnx.Rngs(seed), platform=platform)
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, _str_keys(nnx.to_pure_dict(state))


def abstract_model(cfg: Config, *, platform: str | None = None) -> tuple[nnx.GraphDef, Params]:
    """``create_model(cfg, platform=platform)`` without allocating: the graphdef, and the
    params' shapes and dtypes (jax.ShapeDtypeStruct). What lowering a program needs."""
    built = {}

    def build():
        built["graphdef"], params = create_model(cfg, platform=platform)
        return params

    params = jax.eval_shape(build)
    return built["graphdef"], params


def abstract_params(cfg: Config) -> Params:
    """Shapes and dtypes of ``create_model(cfg)[1]`` without allocating (jax.ShapeDtypeStruct)."""
    return abstract_model(cfg)[1]


def apply_model(
    graphdef: nnx.GraphDef,
    params: Params,
    x: jax.Array,
    constant: jax.Array | None = None,
    log_scale: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """x (B, 6, n_time, n_receivers) float32 (or float16, e.g. from a float16 packed store: cast to
    float32 first, exactly) -> velocity (B, depth, x) float32 km/s. Pure; jit it. ``constant``:
    `constant_tokens` of these params, to reuse them across calls (None: computed in the call).
    ``log_scale`` (``model.error_head`` only): (velocity, the error head's log-scale (B, depth,
    x))."""
    model = nnx.merge(graphdef, nnx.State(_as_state_dict(params)))
    return model(x, constant, log_scale)


def constant_tokens(graphdef: nnx.GraphDef, params: Params) -> jax.Array | None:
    """The zero channel 151's tokens after blocks[:split] (1, 1 + N, dim), a function of the params
    alone (`FWIModel.constant_tokens`); None where it does not apply (`constant_once`). Pure."""
    model = nnx.merge(graphdef, nnx.State(_as_state_dict(params)))
    if not constant_once(model.cfg):
        return None
    return model.constant_tokens()


def _as_state_dict(params: Params) -> Any:
    """String keys that are integers (list indices of nnx.List) become ints again."""
    if isinstance(params, dict):
        return {(int(k) if k.isdigit() else k): _as_state_dict(v) for k, v in params.items()}
    return nnx.Param(params) if not isinstance(params, nnx.Variable) else params


def count_params(params: Params) -> int:
    return int(sum(np.prod(np.shape(p)) for p in jax.tree.leaves(params)))


__all__ = [
    "FWIModel",
    "Params",
    "abstract_model",
    "abstract_params",
    "apply_model",
    "constant_tokens",
    "count_params",
    "create_model",
    "model_size",
]
