"""The platform a model's programs are compiled for.

Platforms are named as ``jax.jit(f).trace(...).lower(lowering_platforms=...)`` names them: cpu,
cuda, rocm, tpu. The model makes its platform-dependent choices (the attention implementation of
``model.attention=auto``, the dense layers' CPU backward pass) when it is built, for the platform
passed to ``fwi_jax.model.create_model(cfg, platform=...)``, and never from the backend of the
process that traces it: so a train step lowered for CUDA on a CPU-only host is the program a
GPU would run.
"""

from __future__ import annotations

import contextlib

import jax

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def target_platform(platform: str | None = None) -> str:
    """``platform`` checked, or (None) this process's default backend by its lowering name:
    "cuda" or "rocm" for a GPU (``jax.default_backend()`` says "gpu" for both)."""
    if platform is None:
        platform = jax.default_backend()
        if platform == "gpu":
            platform = "rocm" if local_devices("rocm") else "cuda"
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}: choose one of {', '.join(PLATFORMS)}")
    return platform


def local_devices(platform: str) -> list[jax.Device]:
    """This process's devices of ``platform`` ([] when it has none, e.g. "cuda" on a CPU host)."""
    try:
        return jax.local_devices(backend=platform)
    except RuntimeError:  # jax raises this for a backend that is absent or failed to start
        return []


# The compute capability a program is compiled for when no GPU is visible (`compiling_for`).
_COMPILE_TARGET_CAPABILITY: float | None = None


@contextlib.contextmanager
def compiling_for(capability: float):
    """Models built inside make their choices as a process on a CUDA GPU of compute capability
    ``capability`` makes them (``cuda_capabilities``), for compiling on compile-only devices
    (``fwi_jax.gpu_compile``) the program that GPU would run."""
    global _COMPILE_TARGET_CAPABILITY
    before, _COMPILE_TARGET_CAPABILITY = _COMPILE_TARGET_CAPABILITY, float(capability)
    try:
        yield
    finally:
        _COMPILE_TARGET_CAPABILITY = before


def cuda_capabilities() -> list[float]:
    """Compute capabilities of this process's CUDA GPUs ([] when it sees none), or of the GPU
    compiled for inside `compiling_for`."""
    if _COMPILE_TARGET_CAPABILITY is not None:
        return [_COMPILE_TARGET_CAPABILITY]
    return [
        float(d.compute_capability)
        for d in local_devices("cuda")
        if getattr(d, "compute_capability", None) is not None
    ]
