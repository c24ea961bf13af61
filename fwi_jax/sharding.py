"""Devices: the 1-D data-parallel mesh, batch placement, and multi-host start-up.

Data parallelism only: the global batch is split along its first axis over every device of every
host (``P("data")``); params, optimiser state and EMA are replicated (``P()``). Each host reads
its own contiguous slice of the global batch (``fwi_jax.data.pipeline`` shards the index space by
``jax.process_index()``) and ``host_to_global`` assembles the global array without copying data
between hosts. The numbers do not depend on the device count: the loss is a mean over the global
batch, whichever device computed each part.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fwi_jax import cli
from fwi_jax.config import ConfigError

DATA_AXIS = "data"
# environment variables that mean "this process is one of several" (jax.distributed reads them)
_CLUSTER_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "COORDINATOR_ADDRESS",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
)


def initialize_distributed(force: bool = False) -> bool:
    """Call ``jax.distributed.initialize()`` when the environment describes a multi-process run
    (SLURM, Open MPI, Cloud TPU, or ``JAX_COORDINATOR_ADDRESS=host:port`` with
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``), or always with ``force``. Returns whether it
    did. Must run before anything touches a JAX device. On CPUs the processes exchange gradients
    through JAX's CPU collectives (``jax_cpu_collectives_implementation``, gloo by default)."""
    if force or any(os.environ.get(k) for k in _CLUSTER_ENV):
        if os.environ.get("SLURM_NTASKS") == "1" and not force:
            return False
        # JAX reads the coordinator address from the environment but not the process count and
        # id, which it takes from a scheduler it recognises; these two name them without one
        count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
        jax.distributed.initialize(
            num_processes=int(count) if count else None, process_id=int(index) if index else None
        )
        _watch_for_a_failed_process()
        return True
    return False


# keys in the coordinator's key-value store: FAILED/<i> tells process i that another stopped
# ("<process>\t<exit code>\t<message>") or, empty, that it is itself exiting normally;
# LEFT/<i> says that process i is leaving
_FAILED, _LEFT = "fwi_jax/failed", "fwi_jax/left"
_WATCHING = False
_FAILING = False


def _watch_for_a_failed_process() -> None:
    """Start a thread that waits (a blocking read of the coordinator's key-value store, no
    polling) for another process to report with `fail` that it stopped; this process then prints
    ``error: process I of N stopped: MESSAGE`` and leaves at once with that process's exit code.
    Without it the others would wait for the one that left in their next collective until JAX's
    timeouts (30 s for the CPU collectives' set-up, 100 s heartbeat) and end with a traceback.
    At a normal exit the thread is released and joined before JAX shuts down (a thread still in
    the read when the interpreter ends aborts the process). Written by hand: JAX has no call that
    reports one process's error to the others."""
    global _WATCHING
    from jax._src import distributed

    state = distributed.global_state  # not jax.process_index(): that would start the backends
    client, me, n = state.client, state.process_id, state.num_processes
    if client is None or n < 2 or _WATCHING:
        return

    def watch() -> None:
        while True:
            try:
                value = client.blocking_key_value_get(f"{_FAILED}/{me}", 3_600_000)
            except Exception as e:  # the hour passed: wait again; the service is gone: done
                if "DEADLINE_EXCEEDED" in str(e):
                    continue
                return
            if value and not _FAILING:  # not when this process is leaving with its own error
                index, code, message = value.split("\t", 2)
                print(f"error: process {index} of {n} stopped: {message}", file=sys.stderr)
                _leave(int(code))
            return

    def release() -> None:  # atexit runs it before JAX's own shutdown (registered earlier)
        try:
            client.key_value_set(f"{_FAILED}/{me}", "")
        except Exception:
            pass  # another process's report got there first: the thread is leaving with it
        thread.join(10)

    thread = threading.Thread(target=watch, name="fwi_jax-failed-process-watch", daemon=True)
    thread.start()
    atexit.register(release)
    _WATCHING = True


def _leave(code: int) -> NoReturn:
    """Exit now, skipping the interpreter's shutdown, where ``jax.distributed.shutdown`` would wait
    (up to 300 s) at a barrier for processes that no longer come. Process 0 hosts the
    coordination service, whose end makes every process still connected abort with a fatal log:
    so the others mark that they are leaving and process 0 leaves last (after at most 10 s)."""
    from jax._src import distributed

    state = distributed.global_state
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if state.process_id == 0:
            for i in range(1, state.num_processes):
                state.client.blocking_key_value_get(f"{_LEFT}/{i}", 10_000)
            time.sleep(0.2)  # from its mark to its exit
        else:
            state.client.key_value_set(f"{_LEFT}/{state.process_id}", "")
    except Exception:
        pass  # a process gone already, or the service: leave all the same
    os._exit(code)


def fail(message: object, code: int = cli.USER_ERROR) -> int:
    """`cli.fail` for a command that may run as one process of several: prints ``error: MESSAGE``;
    in a multi-process run the other processes are told (they print ``error: process I of N
    stopped: MESSAGE`` and exit with ``code`` too) and this one leaves at once. Otherwise returns
    ``code``."""
    global _FAILING
    cli.fail(message)
    if _WATCHING:
        _FAILING = True
        from jax._src import distributed

        state = distributed.global_state
        report = f"{state.process_id}\t{code}\t" + str(message).replace("\n", " ")
        for i in range(state.num_processes):
            if i != state.process_id:
                try:  # the first process to fail is the one named; a later one just leaves
                    state.client.key_value_set(f"{_FAILED}/{i}", report)
                except Exception:
                    pass
        _leave(code)
    return code


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """1-D ``data`` mesh over all devices, ordered by (process, id) so that each host's devices hold
    a contiguous slice of the global batch (the slice that host reads)."""
    devices = sorted(devices or jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_to_global(mesh: Mesh, local: dict[str, np.ndarray] | np.ndarray) -> Any:
    """This host's slice of a batch (NumPy, leading axis = local batch) -> global sharded arrays,
    each in its host dtype (a float16 x stays float16 until the jitted program casts it).
    Non-numeric leaves (sample ids) are dropped from dicts."""
    sharding = batch_sharding(mesh)
    if isinstance(local, dict):
        return {
            k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()
            if np.asarray(v).dtype.kind in "fiub"
        }
    return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def check_batch_divides(global_batch: int, mesh: Mesh) -> None:
    """Raise `ConfigError` unless the global batch splits evenly over the mesh's devices."""
    n = mesh.devices.size
    if global_batch % n:
        raise ConfigError(
            f"the global batch {global_batch} is not a multiple of the {n} devices; "
            f"set train.batch_size to a multiple of {n}"
        )
