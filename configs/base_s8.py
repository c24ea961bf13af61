"""EVA02-base (448 px weights) split at block 8: the reference's `eva02_base_s_at_8`.

Command:
    python -m fwi_jax.train --config base_s8 --data DIR --train-list train_f0.txt \
        --val-list val_f0.txt --init-from eva02_base_patch14_448.mim_in22k_ft_in22k.safetensors

Reproduces: one of the 6 base_s8 members of the reference ensemble (SPEC §5): 40 epochs at
batch 8, weighted relative-L1 loss, EMA from epoch 20.
Expected result: validation MAPE about 0.0209 (reference base_s8 x6 ensemble CV 0.020876,
public LB 0.023591).
Cost: about 2.1 TFLOP per forward (more blocks run on all 6 channels than in base_s6).
"""

from fwi_jax.config import Config, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="base_s8",
        model=ModelConfig(size="base", split=8),
        train=TrainConfig(epochs=40, loss="base"),
    )
