"""The demo's network for about an hour on 2 CPU cores: 4x the data, a constant learning rate.

Command:
    python -m fwi_jax.demo --config demo_hour

Reproduces: nothing of the reference. The demo config (same network, input grid, depth prior
and gain) on 1,024 synthetic training samples (synthesised once, about 8 minutes, and cached),
45 epochs at lr 1e-3 after a warmup, held constant: the learning rate never depends on the run's
length, so this run is the first hour of `scripts/learning_curve.py`'s run (docs/learning.md),
step for step. EMA of the weights from epoch 2.
Expected result and cost: in the table of docs/learning.md.
"""

from fwi_jax.config import load_config


def get_config():
    return load_config("demo").replace(
        **{
            "name": "demo_hour",
            "synth.n_train": 1024,
            "train.epochs": 45,
            "train.constant_fraction": 1.0,
            "train.ema_start_epoch": 2,
            "train.ema_decay": 0.99,
            "train.log_every_steps": 16,
        }
    )
