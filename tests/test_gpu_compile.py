"""The GPU programs compile for the GPUs docs/gpu.md names, on this CPU-only machine, and fit them.

``fwi_jax.gpu_compile`` runs XLA's GPU compiler on compile-only devices made from the target
descriptions in fwi_jax/gpu_targets/ and reads each program's peak memory. What docs/gpu.md says
fits a card is checked here: a change that makes one of those programs too large, or one the GPU
compiler refuses, fails. Needs the CUDA plugin (``pip install -e '.[gpu-compile]'``); skipped,
saying so, without it. About a minute per base_s6 compile on two cores: the full tier.
"""

import importlib.util
import subprocess
import sys

import pytest


def has_cuda_plugin() -> bool:
    return (
        importlib.util.find_spec("jax_plugins") is not None
        and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    )


pytestmark = [
    pytest.mark.full,
    pytest.mark.skipif(
        not has_cuda_plugin(),
        reason="the CUDA plugin is not installed (pip install -e '.[gpu-compile]')",
    ),
]

# (config, target, remat, batch): what docs/gpu.md's memory table says fits
FITS = [
    ("base_s6", "v100_32gb", "full", 8),  # the reference's GPU, float16
    ("base_s6", "l4", "full", 8),  # a 24 GB card, bfloat16
    ("base_s6", "h100", "none", 8),
]


def compile_in_child(*args: str) -> str:
    """``python -m fwi_jax.gpu_compile ARGS`` in its own process: JAX must start with
    JAX_PLATFORMS=cpu and the CUDA plugin's checks off, which this test process may not have."""
    p = subprocess.run(
        [sys.executable, "-m", "fwi_jax.gpu_compile", *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


@pytest.mark.parametrize("config,target,remat,batch", FITS)
def test_train_step_fits_the_card_the_docs_name(config, target, remat, batch):
    out = compile_in_child(
        "--config", config, "--targets", target, "--remat", remat, "--batch", str(batch)
    )
    row = next(line for line in out.splitlines() if line.startswith(f"| {config} | {target} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[7] == "yes", row  # the "fits" column; an error row has no "yes" either


def test_ensemble_compiles_for_the_reference_gpu():
    out = compile_in_child("--config", "base_s6", "--targets", "v100_32gb", "--ensemble", "3")
    row = next(line for line in out.splitlines() if line.startswith("| base_s6 | v100_32gb |"))
    assert "| yes |" in row, row
