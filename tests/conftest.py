import os
import pathlib
import subprocess
import sys

import pytest

# tests/torch_reference.py is imported as a plain module by the parity tests
sys.path.insert(0, str(pathlib.Path(__file__).parent))


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
