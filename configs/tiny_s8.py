"""EVA02-tiny split at block 8, hard-example-mining loss: the reference's `eva02_tiny_s_at_8`.

Command:
    python -m fwi_jax.train --config tiny_s8 --data DIR --train-list train_f0.txt \
        --val-list val_f0.txt --init-from eva02_tiny_patch14_224.mim_in22k.safetensors

Reproduces: one of the 6 tiny members of the reference ensemble (SPEC §5): 80 epochs of 4,599
samples at batch 8 (45,990 steps), AdamW (Muon with `--set train.optimizer=muon`), EMA from
epoch 20, fp16 with loss scaling in the reference (`--set model.dtype=float16`).
Expected result: validation MAPE about 0.0209 (reference tiny_s8 x6 ensemble CV 0.020851).
Cost: about 0.25 TFLOP per forward; about 3.5 h on one A100 in bfloat16 by FLOP count;
training ~0.24 samples/s on 2 idle CPU cores, as the PyTorch reference in the same runs (1.00x, median of
eight; docs/performance.md):
not a CPU job.
"""

from fwi_jax.config import Config, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="tiny_s8",
        model=ModelConfig(size="tiny", split=8),
        train=TrainConfig(epochs=80, loss="hard"),
    )
