"""EVA02-large (448 px weights) split at block 10, single attention fusion (4 heads, then the
channel mean): the first place's `EVA_16_Large_Split_10_Single_MHA_4_heads` (their public model
code).

Command:
    python -m fwi_jax.train --config eva_l_s10_single4 --data DIR --train-list lists/train_f0.txt \
        --val-list lists/val_f0.txt --init-from eva02_large_448.safetensors \
        --set model.dtype=float16
    python -m fwi_jax.infer --config eva_l_s10_single4 --checkpoints eva_l_s10_single4_fold0.pt \
        --data DIR --out OUT.npz

Reproduces: `eva_l_s10_dual4` with the single fusion: pre-norm attention across the five channels
per token (4 heads), then their mean; everything else (input, head, flip TTA, the first place's
input and training recipe, cost) as there. Expected result: 0.02408-0.02419 for one fold (the first
place's public MAPE); not yet measured with this code.
"""

from fwi_jax.config import Config, load_config


def get_config() -> Config:
    return load_config("eva_l_s10_dual4").replace(
        **{"name": "eva_l_s10_single4", "model.fusion": "mha_single"}
    )
