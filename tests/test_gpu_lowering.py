"""The GPU programs lower for CUDA on a CPU-only machine, and hold nothing that only a CPU runs.

JAX lowers a jitted function for a platform it does not have:
``jax.jit(f).trace(*abstract_args).lower(lowering_platforms=("cuda",))``, with
jax.ShapeDtypeStruct arguments (nothing is allocated, nothing compiled or run). The model is
built for the platform it is lowered for (``abstract_model(cfg, platform="cuda")``), as a GPU
process builds it. Each lowered module is checked for custom calls outside `GPU_CUSTOM_CALLS`:
the fused CPU attention kernel, host callbacks and any other CPU-only target would be one.

These programs are lowered here, not compiled or run: CI has no GPU.
"""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from fwi_jax.config import load_config
from fwi_jax.model import FWIModel, abstract_model, onednn
from fwi_jax.model import attention as attention_module
from fwi_jax.model import target as target_module
from fwi_jax.model.attention import attention, resolve_impl

CUDA = ("cuda",)
# custom_call targets a CUDA program may hold: the partitioner's sharding markers (no code).
# Anything else (fwi_attention_forward, xla_ffi_python_cpu_callback, ...) fails the check; a
# GPU library call that a program really needs is added here by name.
GPU_CUSTOM_CALLS = frozenset({"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"})
_CUSTOM_CALL = re.compile(r'stablehlo\.custom_call @([\w$.\-]+)|call_target_name = "([^"]+)"')


def lower_for_cuda(fn, *args, **static) -> str:
    """StableHLO text of ``jax.jit(fn)`` lowered for CUDA with abstract ``args``."""
    fn = fn if hasattr(fn, "trace") else jax.jit(fn)
    return fn.trace(*args, **static).lower(lowering_platforms=CUDA).as_text()


def custom_calls(hlo: str) -> set[str]:
    return {a or b for a, b in _CUSTOM_CALL.findall(hlo)}


def assert_gpu_only(hlo: str) -> None:
    """The lowered module calls no custom target outside GPU_CUSTOM_CALLS."""
    foreign = custom_calls(hlo) - GPU_CUSTOM_CALLS
    assert not foreign, f"custom calls a CUDA program cannot run: {sorted(foreign)}"


def spec(shape, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


# ---------------------------------------------------------------------------------------------
# The check itself


def test_the_check_rejects_cpu_only_calls():
    """The fused CPU attention kernel lowers for CUDA without complaint (an FFI call is only a
    name until the program is compiled), so the check must catch it; attention() refuses it for
    a CUDA program before that; a host callback cannot even be lowered for CUDA here."""
    from fwi_jax.model import fused_attention as fused

    q = spec((1, 197, 2, 64))
    hlo = lower_for_cuda(lambda q: fused.forward(q, q, q, 64)[0], q)
    assert "fwi_attention_forward" in custom_calls(hlo)
    with pytest.raises(AssertionError, match="fwi_attention_forward"):
        assert_gpu_only(hlo)
    with pytest.raises(
        ValueError, match="'fused_cpu' is a CPU kernel; the program is compiled for cuda"
    ):
        attention(
            jnp.zeros((1, 8, 1, 16)),
            jnp.zeros((1, 8, 1, 16)),
            jnp.zeros((1, 8, 1, 16)),
            impl="fused_cpu",
            platform="cuda",
        )
    callback = lambda x: jax.pure_callback(lambda a: a, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
    with pytest.raises(ValueError, match="lowering platform cuda"):
        lower_for_cuda(callback, spec((3,)))
    cpu_hlo = jax.jit(callback).trace(spec((3,))).lower(lowering_platforms=("cpu",)).as_text()
    with pytest.raises(AssertionError, match="python_cpu_callback"):
        assert_gpu_only(cpu_hlo)


# ---------------------------------------------------------------------------------------------
# model.attention=auto is decided for the platform compiled for


class _FakeGpu:
    def __init__(self, capability):
        self.compute_capability = capability


def _attention_impls(cfg, platform):
    model = nnx.eval_shape(lambda: FWIModel(cfg, rngs=nnx.Rngs(0), platform=platform))
    return {block.attn.impl for block in model.blocks}


def test_auto_attention_is_decided_for_the_target_platform(monkeypatch, capsys):
    """On this CPU host: auto is fused_cpu for a CPU program (onednn for this bfloat16 model where
    oneDNN has native bfloat16 kernels) and blockwise for a CUDA one (no GPU to trace cuDNN
    with), said once on stderr; with GPUs visible it follows their compute
    capability and the compute dtype (cuDNN takes float16 and bfloat16 only); rocm and tpu
    programs get xla."""
    attention_module._say_once.cache_clear()
    cfg = load_config("tiny_s8", ["model.depth=2", "model.split=1", "model.dtype=bfloat16"])
    assert _attention_impls(cfg, "cuda") == {"blockwise"}
    cpu_impl = "onednn" if onednn.native_bfloat16() else "fused_cpu"
    assert _attention_impls(cfg, "cpu") == {cpu_impl}
    assert _attention_impls(cfg, None) == {cpu_impl}  # None: this process's backend, a CPU
    err = capsys.readouterr().err
    assert (
        err.count("model.attention=auto -> blockwise for cuda: this process sees no CUDA GPU") == 1
    )
    assert err.count(f"model.attention=auto -> {cpu_impl} for cpu") == 1
    assert resolve_impl("auto", "tpu") == resolve_impl("auto", "rocm") == "xla"
    with pytest.raises(ValueError, match="'cudnn' cannot run: this process sees no CUDA GPU"):
        resolve_impl("cudnn", "cuda")  # cuDNN cannot be traced without one
    for capabilities, expected in (
        (["9.0"], "cudnn"),
        (["8.0", "8.6"], "cudnn"),
        (["7.0"], "blockwise"),
        (["8.0", "7.5"], "blockwise"),
    ):
        fake = [_FakeGpu(c) for c in capabilities]
        monkeypatch.setattr(target_module, "local_devices", lambda platform, fake=fake: fake)
        assert resolve_impl("auto", "cuda", 64, jnp.bfloat16) == expected, capabilities
        assert _attention_impls(cfg, "cuda") == {expected}
    # an sm90 GPU: float32 compute or a head_dim cuDNN does not take -> blockwise
    monkeypatch.setattr(target_module, "local_devices", lambda platform: [_FakeGpu("9.0")])
    assert _attention_impls(cfg.replace(**{"model.dtype": "float32"}), "cuda") == {"blockwise"}
    assert resolve_impl("auto", "cuda", 60, jnp.float16) == "blockwise"
    with pytest.raises(ValueError, match="takes float16 or bfloat16, not float32"):
        resolve_impl("cudnn", "cuda", 64, jnp.float32)
    assert "float16 or bfloat16, not float32 (model.dtype)" in capsys.readouterr().err
    # compiling for a GPU that is not there (fwi_jax.gpu_compile): the choice of that GPU
    monkeypatch.setattr(target_module, "local_devices", lambda platform: [])
    with target_module.compiling_for(9.0):
        assert resolve_impl("auto", "cuda", 64, jnp.bfloat16) == "cudnn"
        with target_module.compiling_for(7.0):
            assert resolve_impl("auto", "cuda", 64, jnp.float16) == "blockwise"
        assert resolve_impl("auto", "cuda", 64, jnp.bfloat16) == "cudnn"
    assert resolve_impl("auto", "cuda", 64, jnp.bfloat16) == "blockwise"  # no GPU again


# ---------------------------------------------------------------------------------------------
# The programs


# Every pair of values of two settings (config, dtype, attention, remat) occurs in one of these
# five cases (a pairwise covering of the 2 x 2 x 2 x 2 product, whose 16 cases would take three
# times as long to trace): each config in both dtypes, with both attentions and both remats.
TRAIN_CASES = [
    ("tiny_s8", "float16", "xla", "none"),
    ("tiny_s8", "bfloat16", "blockwise", "full"),
    ("base_s6", "float16", "blockwise", "full"),
    ("base_s6", "bfloat16", "xla", "full"),
    ("base_s6", "bfloat16", "blockwise", "none"),
]


def test_train_cases_cover_every_pair():
    values = [sorted({case[i] for case in TRAIN_CASES}) for i in range(4)]
    assert values == [
        ["base_s6", "tiny_s8"],
        ["bfloat16", "float16"],
        ["blockwise", "xla"],
        ["full", "none"],
    ]
    for i, j in itertools.combinations(range(4), 2):
        pairs = {(case[i], case[j]) for case in TRAIN_CASES}
        assert pairs == set(itertools.product(values[i], values[j])), (i, j)


@pytest.mark.parametrize("config,dtype,impl,remat", TRAIN_CASES)
def test_train_step_lowers_for_cuda(config, dtype, impl, remat):
    """The full-size train step (forward, loss, backward, loss-scale check, AdamW, EMA) at the
    config's batch: no CPU-only call; the compute dtype, attention and remat asked for are the
    ones lowered, and none of the CPU dense layers' backward pass (its optimization barriers)."""
    from fwi_jax.train import abstract_train_step

    cfg = load_config(
        config, [f"model.dtype={dtype}", f"model.attention={impl}", f"model.remat={remat}"]
    )
    step, state, batch = abstract_train_step(cfg, cfg.train.batch_size, platform="cuda")
    assert state["loss_scale"].dynamic == (dtype == "float16")  # float16 trains with loss scaling
    hlo = lower_for_cuda(jax.jit(step, donate_argnums=0), state, batch)

    assert_gpu_only(hlo)
    short, other = {"float16": ("f16", "bf16"), "bfloat16": ("bf16", "f16")}[dtype]
    assert re.search(rf"x{short}>", hlo) and not re.search(rf"x{other}>", hlo)
    n = 1 + cfg.geometry.grid[0] * cfg.geometry.grid[1]
    assert (f"{n}x{n}x" in hlo) == (impl == "xla")  # only xla materialises (N, N) scores
    barriers = hlo.count("stablehlo.optimization_barrier")
    assert (barriers > 0) == (remat == "full"), barriers


def test_ensemble_inference_lowers_for_cuda():
    """The stacked-ensemble program with flip TTA in the batch (a GPU's default) and every member
    at once: two groups (two tiny_s8 float16 members, one base_s6 bfloat16), full size."""
    from fwi_jax.ensemble import Group, ensemble_fn

    groups = []
    for config, dtype, members in (("tiny_s8", "float16", 2), ("base_s6", "bfloat16", 1)):
        cfg = load_config(config, [f"model.dtype={dtype}"])
        graphdef, params = abstract_model(cfg, platform="cuda")
        stacked = jax.tree.map(lambda a, m=members: spec((m, *a.shape), a.dtype), params)
        groups.append(
            Group(
                cfg=cfg,
                graphdef=graphdef,
                params=stacked,
                weights=spec((members,)),
                sources=[config] * members,
            )
        )
    g = groups[0].cfg.geometry
    fn = ensemble_fn(groups, tta=True, member_chunk=None, tta_in_batch=True)
    hlo = lower_for_cuda(
        fn,
        tuple(gr.params for gr in groups),
        tuple(gr.weights for gr in groups),
        spec((4, 6, g.n_time, g.n_receivers)),
    )
    assert_gpu_only(hlo)
    assert "tensor<2x8x" in hlo  # both tiny members at once, on the batch and its flipped copy


def test_simulator_lowers_for_cuda():
    """The wave simulator on the competition grid (fast mode, all shots at once as on a GPU),
    and the gradient of a data misfit with respect to the velocity model."""
    from fwi_jax.synth.wave import MODEL_SHAPE, simulate_shots

    v = spec(MODEL_SHAPE)
    assert_gpu_only(lower_for_cuda(simulate_shots, v, mode="fast", shot_batch=None))

    def misfit(v, observed):
        return jnp.sum((simulate_shots(v, mode="fast", remat=True) - observed) ** 2)

    observed = jax.eval_shape(lambda v: simulate_shots(v, mode="fast"), v)
    assert_gpu_only(lower_for_cuda(jax.grad(misfit), v, observed))


def test_gpu_doc_commands_parse():
    """docs/gpu.md's commands parse as the README's do (tests/test_readme.py's rules)."""
    import pathlib

    from test_readme import check_command, readme_commands

    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "gpu.md"
    commands = readme_commands(doc.read_text())
    assert {module for module, _ in commands} == {
        "fwi_jax.train",
        "fwi_jax.infer",
        "fwi_jax.gpu_compile",
    }
    for module, args in commands:
        check_command(module, args)
