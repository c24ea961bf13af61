"""Devices: the 1-D data-parallel mesh, batch placement, and multi-host start-up.

Data parallelism only: the global batch is split along its first axis over every device of every
host (``P("data")``); params, optimiser state and EMA are replicated (``P()``). Each host reads
its own contiguous slice of the global batch (``fwi_jax.data.pipeline`` shards the index space by
``jax.process_index()``) and ``host_to_global`` assembles the global array without copying data
between hosts. The numbers do not depend on the device count: the loss is a mean over the global
batch, whichever device computed each part.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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
        return True
    return False


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
