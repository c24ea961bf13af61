"""Process-level tuning of a CPU host for XLA:CPU (the only place that changes process settings).

XLA:CPU allocates one temporary buffer per execution of a compiled program (gigabytes for a
tiny_s8 train step) and frees it afterwards. glibc serves allocations that large with a fresh
``mmap`` and gives the pages back on free, so every step page-faults and zero-fills the whole
buffer again, a large share of each step spent in the kernel (perf: ``clear_page_erms``,
``exc_page_fault``; figures in docs/performance.md). :func:`tune_cpu_host` stops that:

- ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, SIZE_MAX)``: large blocks come from
  the main heap and freed memory stays in the process, so the next step reuses pages that are
  already mapped. The resident size stays at the run's peak (it is needed again at every step).
- ``jax_cpu_enable_async_dispatch=False``: programs then execute on the calling (main) thread,
  whose allocations use glibc's main heap; asynchronous dispatch runs them on runtime threads
  whose per-thread heaps fall back to ``mmap`` for large blocks whatever ``M_MMAP_MAX`` says.
  Host work then no longer overlaps a running step; the data loader's threads still prefetch.

Nothing is done on GPUs/TPUs, where device memory has its own allocator. Set
``FWI_JAX_CPU_TUNING=0`` to leave the process as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import jax

ENV_SWITCH = "FWI_JAX_CPU_TUNING"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h>
_applied: str | None = None


def tune_cpu_host(verbose: bool = True) -> str:
    """Apply the tuning above when JAX's default backend is the CPU; idempotent. Must run before
    anything starts JAX's backends (``jax.devices()``, ``jax.process_index()``, a computation).
    Returns a line saying what was done or why nothing was; ``verbose`` prints it once, on
    process 0."""
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get(ENV_SWITCH, "1") == "0":
        msg = f"host: CPU tuning off ({ENV_SWITCH}=0)"
    elif _backends_started():  # e.g. a second train() in one process, or a test calling main()
        msg = (
            "host: CPU tuning NOT applied: JAX's backends had already started (call "
            "fwi_jax.host.tune_cpu_host() before anything touches a device)"
        )
    else:
        # set before the backend exists: the CPU client reads it once, at creation; it concerns the
        # CPU client only, so it is harmless where the default backend is a GPU
        jax.config.update("jax_cpu_enable_async_dispatch", False)
        if jax.default_backend() != "cpu":
            msg = f"host: no CPU tuning on {jax.default_backend()}"
        else:
            kept = _keep_freed_memory()
            msg = (
                "host: CPU tuning: synchronous dispatch; "
                + (
                    "freed memory kept in the process (glibc mallopt)"
                    if kept is None
                    else f"freed memory NOT kept ({kept}): each step re-faults its temporary buffer"
                )
                + f"; {ENV_SWITCH}=0 turns this off"
            )
    _applied = msg
    if verbose and jax.process_index() == 0:
        print(msg, flush=True)
    return msg


def _backends_started() -> bool:
    from jax._src import xla_bridge  # no public API says whether the backends exist yet

    return bool(getattr(xla_bridge, "_backends", None))


def _keep_freed_memory() -> str | None:
    """glibc: serve large blocks from the heap and never trim it. Returns None, or why not."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return f"no glibc mallopt in {name or 'libc.so.6'}"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # -1 becomes SIZE_MAX inside glibc: the heap is never trimmed
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, -1) != 1:
        return "mallopt refused"
    return None
