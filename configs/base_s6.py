"""EVA02-base (448 px weights) split at block 6: the reference's `eva02_base_s_at_6`.

Command:
    python -m fwi_jax.train --config base_s6 --data DIR --train-list lists/train_f0.txt \
        --val-list lists/val_f0.txt --init-from eva02_base_448.safetensors \
        --set model.dtype=bfloat16

Reproduces: one of the 10 base_s6 members of the reference ensemble (docs/reference.md §5): 40
epochs at batch 8 (22,990 steps on 4,599 samples), depth-weighted relative-L1 loss, EMA from
epoch 20. The reference trained with Muon (MuonWithAuxAdam); `--set train.optimizer=muon` selects
it. The default, AdamW with the same lr, betas and weight decay, is this project's choice.
Expected result: the reference's 10-member ensemble scored CV MAPE 0.020559 (public leaderboard
0.023526); it published no single-member figure, so expect one member somewhat above that. Not
yet measured with this code.
Cost: 1.7 TFLOP per forward pass, 5.1 TFLOP per training sample; projected 6-8.5 h per run on a
V100 in float16 (docs/performance.md §7). Memory at batch 8 in float16: 12.8 GiB estimated with
`--set model.remat=full model.attention=blockwise`, which fits a 24 GB GPU.
"""

from fwi_jax.config import Config, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="base_s6",
        model=ModelConfig(size="base", split=6),
        train=TrainConfig(epochs=40, loss="base"),
    )
