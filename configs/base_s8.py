"""EVA02-base (448 px weights) split at block 8: the reference's `eva02_base_s_at_8`.

Command:
    python -m fwi_jax.train --config base_s8 --data DIR --train-list lists/train_f0.txt \
        --val-list lists/val_f0.txt --init-from eva02_base_448.safetensors \
        --set model.dtype=bfloat16

Reproduces: one of the 6 base_s8 members of the reference ensemble (docs/reference.md §5): 40
epochs at batch 8, depth-weighted relative-L1 loss, EMA from epoch 20. The reference trained with
Muon (MuonWithAuxAdam); `--set train.optimizer=muon` selects it. The default, AdamW with the same
lr, betas and weight decay, is this project's choice.
Expected result: the reference's 6-member ensemble scored CV MAPE 0.020876 (public leaderboard
0.023591); expect one member somewhat above that. Not yet measured with this code.
Cost: 2.1 TFLOP per forward pass (two more blocks run on all 6 channels than in base_s6), about
1.2x base_s6's time per run.
"""

from fwi_jax.config import Config, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="base_s8",
        model=ModelConfig(size="base", split=8),
        train=TrainConfig(epochs=40, loss="base"),
    )
