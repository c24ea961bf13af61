"""fwi_jax.host: the CPU tuning keeps freed memory mapped (no page faults when a large buffer is
allocated again) and makes CPU dispatch synchronous; FWI_JAX_CPU_TUNING=0 leaves both alone.

Each case runs in a fresh interpreter: the tuning is process-wide and must not leak into the
pytest process. Page faults are counted with getrusage (minor faults) around the second allocation
of a 256 MiB buffer written in full: 65,536 faults of 4 KiB pages when glibc maps fresh memory,
almost none when the freed block is reused. The threshold (10 % of the pages) separates the two by
an order of magnitude either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, json, resource
from fwi_jax import host
msg = host.tune_cpu_host(verbose=False)
import jax

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)

def faults_of_allocation(nbytes):
    # as XLA:CPU allocates its temporary buffer: plain malloc (numpy would madvise huge pages)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ptr = libc.malloc(nbytes)
    ctypes.memset(ptr, 1, nbytes)
    libc.free(ptr)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

nbytes = 256 * 2**20
faults_of_allocation(nbytes)  # the first allocation maps the memory either way
print(json.dumps({"msg": msg, "async": bool(jax.config.read("jax_cpu_enable_async_dispatch")),
                  "faults": faults_of_allocation(nbytes), "pages": nbytes // 4096}))
"""


def _probe(switch: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "FWI_JAX_CPU_TUNING"}
    if switch is not None:
        env["FWI_JAX_CPU_TUNING"] = switch
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_cpu_tuning_keeps_freed_memory_and_dispatches_synchronously():
    tuned, plain = _probe(None), _probe("0")
    assert "synchronous dispatch" in tuned["msg"] and "NOT kept" not in tuned["msg"], tuned["msg"]
    assert tuned["async"] is False
    assert tuned["faults"] < 0.1 * tuned["pages"], tuned
    # the probe can see the difference: without the tuning the same allocation faults every page
    assert "off" in plain["msg"] and plain["async"] is True
    assert plain["faults"] > 0.9 * plain["pages"], plain


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
@pytest.mark.parametrize(
    "module,argv",
    [
        ("fwi_jax.train", ["--config", "no_such_config"]),  # stops at load_config, after the tuning
        # stops at the --out check
        ("fwi_jax.infer", ["--data", ".", "--checkpoints", "none", "--out", "x.txt"]),
    ],
)
def test_commands_apply_the_tuning_before_jax_starts(module, argv, tmp_path):
    """train and infer must tune before anything starts JAX's backends (jax.process_index() does:
    a call placed after it would only print "NOT applied")."""
    env = {k: v for k, v in os.environ.items() if k != "FWI_JAX_CPU_TUNING"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-m", module, *argv], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "host: CPU tuning: synchronous dispatch; freed memory kept" in out.stdout, (
        out.stdout + out.stderr[-2000:]
    )
