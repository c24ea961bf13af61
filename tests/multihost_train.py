"""One process of a training run, started by tests/test_multihost.py once per process: the start-up
of ``python -m fwi_jax.train`` (``jax.distributed`` from the environment, CPU tuning), then
``train`` with a hook that records the sample ids this process read at each step.

    python tests/multihost_train.py DATA WORKDIR OUT_JSON [KEY=VALUE ...]   (config overrides)

OUT_JSON (its "{process}" replaced by this process's index) gets {process, processes,
local_devices, devices, read: {step: [ids]}, summary}.
"""

import json
import sys

from fwi_jax import sharding
from fwi_jax.host import tune_cpu_host


def main() -> None:
    data, workdir, out, *overrides = sys.argv[1:]
    sharding.initialize_distributed()
    tune_cpu_host(verbose=False)
    import jax

    from fwi_jax.config import load_config
    from fwi_jax.train import train

    cfg = load_config("demo", [f"data.root={data}", *overrides])
    read = {}

    def record(step: int, batch: dict) -> None:
        read[step] = [str(i) for i in batch["id"]]

    summary = train(cfg, workdir, progress=False, on_batch=record)
    with open(out.format(process=jax.process_index()), "w") as f:
        json.dump(
            {
                "process": jax.process_index(),
                "processes": jax.process_count(),
                "local_devices": jax.local_device_count(),
                "devices": jax.device_count(),
                "read": read,
                "summary": {k: v for k, v in summary.items() if k != "traces"},
            },
            f,
        )


if __name__ == "__main__":
    main()
