import os
import pathlib
import subprocess
import sys

import pytest

# tests/torch_reference.py is imported as a plain module by the parity tests
sys.path.insert(0, str(pathlib.Path(__file__).parent))

# The suite runs on the CPU, in this process and the commands it starts. The CUDA plugin of the
# gpu-compile extra would otherwise try to start a GPU backend in every JAX process and print
# its failure where tests read stderr; GPU programs are compiled by tests/test_gpu_compile.py.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _named_tests(config) -> bool:
    return any("::" in arg for arg in config.args)


def pytest_configure(config):
    """Two tiers. Plain ``pytest`` runs the fast tier: every test not marked ``full``. The full
    tier (full-size parity, several processes, devito, the end-to-end demo, GPU compiles) runs
    with ``pytest -m full``, everything with ``pytest -m "full or not full"``. A test named on the
    command line (``path::name``) runs whatever its tier."""
    if not config.option.markexpr and not _named_tests(config):
        config.option.markexpr = "not full"


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject.toml's addopts): the fast tier runs its files on two worker
    processes (its tests are short and mostly single-threaded compiles, so two overlap well on
    two cores: 1.4x measured); the full tier's tests, each of them using every core and up to
    half the memory, and a test named on the command line run in this process."""
    if config.option.markexpr or _named_tests(config):
        return 0
    return max(1, min(2, os.cpu_count() or 1))


@pytest.fixture
def mount_tmpfs():
    """``mount_tmpfs(path, options)``: a tmpfs mounted at ``path`` (unmounted after the test), for a
    really full or really read-only file system; skips where mounting is not allowed (needs root
    with CAP_SYS_ADMIN)."""
    mounted = []

    def mount(path: pathlib.Path, options: str) -> pathlib.Path:
        path.mkdir(parents=True, exist_ok=True)
        command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
        if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)
