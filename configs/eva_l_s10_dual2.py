"""EVA02-large (448 px weights) split at block 10, dual attention fusion (2 channel heads, 2 query
heads): the first place's `EVA_16_Large_Split_10_Multi_MHA_2_heads` (their public model code).

Command:
    python -m fwi_jax.train --config eva_l_s10_dual2 --data DIR --train-list lists/train_f0.txt \
        --val-list lists/val_f0.txt --init-from eva02_large_448.safetensors \
        --set model.dtype=float16
    python -m fwi_jax.infer --config eva_l_s10_dual2 --checkpoints eva_l_s10_dual2_fold0.pt \
        --data DIR --out OUT.npz

Reproduces: `eva_l_s10_dual4` with 2 heads in the cross-channel attention; everything else (input,
head, flip TTA, the first place's input and training recipe, cost) as there. Expected result: no
single-model figure published; the first place's four-model ensemble scored 0.023458 (public MAPE);
not yet measured with this code.
"""

from fwi_jax.config import Config, load_config


def get_config() -> Config:
    return load_config("eva_l_s10_dual4").replace(
        **{"name": "eva_l_s10_dual2", "model.fusion_heads": 2}
    )
