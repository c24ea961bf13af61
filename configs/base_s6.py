"""EVA02-base (448 px weights) split at block 6: the reference's `eva02_base_s_at_6`.

Command:
    python -m fwi_jax.train --config base_s6 --data DIR --train-list train_f0.txt \
        --val-list val_f0.txt --init-from eva02_base_patch14_448.mim_in22k_ft_in22k.safetensors

Reproduces: one of the 10 base_s6 members of the reference ensemble (SPEC §5): 40 epochs at
batch 8 (22,990 steps), weighted relative-L1 loss, EMA from epoch 20.
Expected result: validation MAPE about 0.0206 (reference base_s6 x10 ensemble CV 0.020559,
public LB 0.023526).
Cost: about 1.7 TFLOP per forward, 5.1 TFLOP per training sample; the reference took about 5 h
per run on a V100-32GB in fp16. Use `--set model.dtype=bfloat16` on Ampere or newer,
`model.dtype=float16` on a V100; `model.remat=full` with blockwise attention to fit 24 GB (estimated 12.8 GiB at batch 8 in
float16; `dots` estimates 22.7 GiB, 24.4 GB, see docs/performance.md).
"""

from fwi_jax.config import Config, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="base_s6",
        model=ModelConfig(size="base", split=6),
        train=TrainConfig(epochs=40, loss="base"),
    )
