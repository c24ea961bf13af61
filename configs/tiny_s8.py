"""EVA02-tiny split at block 8, hard-example-mining loss: the reference's `eva02_tiny_s_at_8`.

Command:
    python -m fwi_jax.train --config tiny_s8 --data DIR --train-list lists/train_f0.txt \
        --val-list lists/val_f0.txt --init-from eva02_tiny_224.safetensors \
        --set model.dtype=bfloat16

Reproduces: one of the 6 tiny_s8 members of the reference ensemble (docs/reference.md §5): 80
epochs at batch 8 (45,990 steps on 4,599 samples), EMA from epoch 20; the reference ran in
float16 with loss scaling (`--set model.dtype=float16`). The reference trained with Muon
(MuonWithAuxAdam); `--set train.optimizer=muon` selects it. The default, AdamW with the same lr,
betas and weight decay, is this project's choice.
Expected result: the reference's 6-member ensemble scored CV MAPE 0.020851; expect one member
somewhat above that. Not yet measured with this code.
Cost: 0.25 TFLOP per forward pass, 0.76 TFLOP per training sample; projected 2-2.5 h per run on a
V100 in float16 (docs/performance.md §7). On 2 idle CPU cores training runs at 0.24 samples/s,
as fast as the PyTorch reference (2026-11-30, 2-core Xeon; docs/performance.md §2): about 18 days
per run, so not a CPU job.
"""

from fwi_jax.config import Config, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="tiny_s8",
        model=ModelConfig(size="tiny", split=8),
        train=TrainConfig(epochs=80, loss="hard"),
    )
