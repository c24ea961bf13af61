"""EVA02-large (448 px weights) split at block 10, dual attention fusion (4 channel heads, 2 query
heads): the first place's `EVA_16_Large_Split_10_Multi_MHA_4_heads` (thinkonward/challenges,
geoscience/speed-and-structure/Flamethrower/src/models/).

Command:
    python -m fwi_jax.train --config eva_l_s10_dual4 --data DIR --train-list lists/train_f0.txt \
        --val-list lists/val_f0.txt --init-from eva02_large_448.safetensors \
        --set model.dtype=bfloat16
    python scripts/bench_infer.py --config eva_l_s10_dual4 --members 1 --samples 3 \
        --torch-samples 3                       # against their PyTorch module, ~8 min idle
    python scripts/bench_train.py --config eva_l_s10_dual4 --batch 1 --steps 3 --warmup 1 \
        --attention auto --remat full --set train.optimizer=adamw \
        --set model.scan_blocks=true            # against their PyTorch module, ~25 min idle
    python scripts/memory_estimate.py --config eva_l_s10_dual4 --batch 1 --dtype float16 \
        --attention blockwise --remat full dots   # GPU memory, compile only, ~12 min
    python -m fwi_jax.infer --config eva_l_s10_dual4 --checkpoints eva_l_s10_dual4_fold0.pt \
        --data DIR --out OUT.npz

Reproduces: the first place's network exactly (five shots, amplitudes x1e3, fold 10000 -> 100 x
3100, bilinear to 560 x 560, 40 x 40 tokens of 14 px, a channel position embedding, cross-channel
attention, attention from a learned query, LayerNorm, Linear(1024 -> 300) per token, area resize
over tokens to 1259, sigmoid to 1.5-4.5 km/s; flip TTA reverses the receivers only), so their
state_dicts convert key by key and run as trained. Two input steps differ: their 10001 time samples
are area-resampled to 10000 where this project drops the last one, and their training used an L1
loss with a cosine-then-constant schedule that `train.loss` does not offer. Expected result:
0.02391-0.02398 for one fold, 0.023491 for five folds (the first place's public MAPE); not yet
measured with this code. Cost: 3.4 TFLOP per forward pass at batch 1 (XLA's count; five channels
through 10 of 24 blocks of 1601 tokens); float16 training at batch 1 needs 8.5 GiB (remat full) or
10.5 GiB (dots) on a GPU (estimates); on a 2-core CPU one sample with flip TTA takes 51 s (PyTorch
59 s), and a float32 training step at batch 1 97 s with remat full and scanned blocks (11.3 GiB;
PyTorch 94 s; unrolled without remat it needs more than 24 GiB); the first place reports about
13 h per fold on an A6000 for 30 epochs at batch 1.
"""

from fwi_jax.config import Config, Geometry, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="eva_l_s10_dual4",
        geometry=Geometry(
            fold=100,
            resize=(560, 560),
            patch=14,
            channels=5,
            input_scale=0.1,
            head="token_linear",
            flip_channels=False,
        ),
        model=ModelConfig(
            size="large", split=10, fusion="mha_dual", fusion_heads=4, fusion_query_heads=2
        ),
        train=TrainConfig(batch_size=1, epochs=30, optimizer="muon", lr=1e-4, ema_decay=0.99),
    )
