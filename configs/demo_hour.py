"""The demo's network for about an hour on 2 CPU cores: 4x the data, a constant learning rate.

Command:
    python -m fwi_jax.demo --config demo_hour

Reproduces: nothing of the reference. The demo config (same network, input grid, depth prior and
gain) on 1,024 synthetic training samples (synthesised once, about 8 minutes, and cached), 42
epochs at lr 1e-3 after the warmup, held constant, EMA of the weights from epoch 2. The learning
rate never depends on the run's length, so this run is step for step the first hour of the
learning curve's run (docs/learning.md).
Expected result: validation MAPE 0.0752 after the 42 epochs (32 validation samples, whose
mean-velocity-profile baseline is 0.1028: 0.73x), the best epoch 0.0728 (epoch 14, 0.71x); the
held-out evaluation uses that best epoch. Not the 0.5x hoped for: at a constant learning rate the
curve is flat from about 20 minutes on (docs/learning.md says what limits it).
Cost: 59 min of training (epoch 42 ended at 3,542 s of the learning curve's run, 2026-12-02,
2-core AMD EPYC), plus the synthesis on first use.
"""

from fwi_jax.config import load_config


def get_config():
    return load_config("demo").replace(
        **{
            "name": "demo_hour",
            "synth.n_train": 1024,
            "train.epochs": 42,
            "train.constant_fraction": 1.0,
            "train.ema_start_epoch": 2,
            "train.ema_decay": 0.99,
            "train.log_every_steps": 16,
        }
    )
