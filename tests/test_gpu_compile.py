"""The GPU programs compile for the GPUs docs/gpu.md names, on this CPU-only machine, and fit them.

``fwi_jax.gpu_compile`` runs XLA's GPU compiler on compile-only devices made from the target
descriptions in fwi_jax/gpu_targets/ and reads each program's peak memory. What docs/gpu.md says
fits a card is checked here: a change that makes one of those programs too large, or one the GPU
compiler refuses, fails. About a minute per base_s6 compile on two cores: the full tier.

The compiles run in a virtual environment of their own, ``.venv-gpu`` at the repository's root
(or the Python that ``$FWI_JAX_GPU_PYTHON`` names), made by the README's full-tier command:
``python -m venv .venv-gpu && .venv-gpu/bin/pip install -c constraints.txt -e '.[gpu-compile]'``.
The CUDA plugin prints its failure to find a GPU whenever JAX is imported beside it, so it stays
out of the environment the rest of the suite reads stderr in. Without that environment these
tests are skipped, saying how to make it.
"""

import functools
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
GPU_PYTHON = os.environ.get("FWI_JAX_GPU_PYTHON", str(ROOT / ".venv-gpu" / "bin" / "python"))


@functools.cache
def has_cuda_plugin() -> bool:
    if not pathlib.Path(GPU_PYTHON).is_file():
        return False
    probe = [
        GPU_PYTHON,
        "-c",
        "import importlib.util as u; assert u.find_spec('jax_plugins.xla_cuda12')",
    ]
    return subprocess.run(probe, capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.full,
    pytest.mark.skipif(
        not has_cuda_plugin(),
        reason=f"no Python with the CUDA plugin at {GPU_PYTHON}: python -m venv .venv-gpu && "
        ".venv-gpu/bin/pip install -c constraints.txt -e '.[gpu-compile]'",
    ),
]

# (config, target, remat, batch, attention, XLA_FLAGS): rows of docs/gpu.md's memory table that
# say "fits", with the attention each GPU's model.attention=auto picks: blockwise on the V100
# (float16), cuDNN's flash attention on the L4 and the H100 (bfloat16; it compiles only on an
# even token count, which fwi_jax.model.attention.even_length_attention makes of 1,981 or 1,601).
# The first place's model in bfloat16 compiles only with XLA's Triton GEMMs off (docs/gpu.md).
TRITON_OFF = "--xla_gpu_enable_triton_gemm=false"
FITS = [
    ("tiny_s8", "v100_32gb", "none", 8, "blockwise", ""),  # the reference's GPU
    ("tiny_s8", "l4", "none", 8, "cudnn", ""),  # a 24 GB card
    ("tiny_s8", "h100", "none", 8, "cudnn", ""),
    ("base_s6", "v100_32gb", "none", 8, "blockwise", ""),
    ("base_s6", "l4", "full", 8, "cudnn", ""),
    ("base_s6", "h100", "none", 8, "cudnn", ""),
    ("eva_l_s10_dual4", "v100_32gb", "full", 1, "blockwise", ""),  # the first place's batch
    ("eva_l_s10_dual4", "l4", "full", 1, "cudnn", TRITON_OFF),
    ("eva_l_s10_dual4", "h100", "full", 1, "cudnn", TRITON_OFF),
]


def compile_in_child(*args: str, xla_flags: str = "") -> tuple[str, str]:
    """``python -m fwi_jax.gpu_compile ARGS`` in the environment with the CUDA plugin: (stdout,
    stderr)."""
    p = subprocess.run(
        [GPU_PYTHON, "-m", "fwi_jax.gpu_compile", *args],
        cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": xla_flags},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout, p.stderr


def fits_row(out: str, config: str, target: str) -> list[str]:
    row = next(line for line in out.splitlines() if line.startswith(f"| {config} | {target} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[7] == "yes", row  # the "fits" column; an error row has no "yes" either
    return cells


@pytest.mark.parametrize("config,target,remat,batch,attention,xla_flags", FITS)
def test_train_step_fits_the_card_the_docs_name(config, target, remat, batch, attention, xla_flags):
    out, err = compile_in_child(
        "--config",
        config,
        "--targets",
        target,
        "--remat",
        remat,
        "--batch",
        str(batch),
        xla_flags=xla_flags,
    )
    fits_row(out, config, target)
    assert f"model.attention=auto -> {attention} for cuda" in err, err[-2000:]


@pytest.mark.parametrize("target", ["v100_32gb", "l4", "h100"])
def test_ensemble_compiles_for_the_gpus(target):
    out, _ = compile_in_child(
        "--config", "base_s6", "--targets", target, "--ensemble", "3", "--batch", "4"
    )
    fits_row(out, "base_s6", target)
