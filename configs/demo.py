"""CPU-sized demo: the full code path on a reduced input grid with a 4-block EVA02, on synthetic data.

Command:
    python -m fwi_jax.demo                      # synth -> train 2 members -> ensemble + TTA -> plots
    python -m fwi_jax.train --config demo --workdir runs/demo   # one member only

Reproduces: nothing from the reference; it shows the pipeline end to end on a machine with no
downloads. The run synthesises its own competition-format dataset (fwi_jax.synth, cached) when
`data.root` is empty, trains for a few epochs, and still predicts full-size 1259 x 300 models.
Expected result (measured 2026-11-30 on a 2-core CPU, from an empty cache, fused_cpu attention):
held-out MAPE of the 2-member ensemble with flip TTA 0.0769, against 0.0871 for the
mean-velocity-profile baseline; the members' best validation MAPE 0.0783 and 0.0724. The
attention's summation order moves these by a few 1e-3 from one implementation to the next
(query_blocks: 0.0745, members 0.0761 / 0.0739; commit c92e64d, blockwise: 0.0737). At lr 1e-3,
two of four seeds saturated the output sigmoid within 20 steps and never recovered (gradient
norm < 1e-10), so the demo uses 5e-4. The train loop warns when that happens.
Cost: 10 min 32 s on 2 CPU cores for the whole `python -m fwi_jax.demo`: 2 min 42 s of data
synthesis (cached after the first run; the kernel build's 5 s included), 7 min 38 s for training
two members, and the ensemble inference and plots in the remaining seconds (11 min 1 s with
query_blocks attention, 13 min 20 s on the earlier machine and code).
"""

from fwi_jax.config import Config, DataConfig, Geometry, ModelConfig, SynthConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="demo",
        # (1000, 310) folded shots -> 420 x 84 px -> 30 x 6 tokens; each token paints 42 x 56 px
        # of a 1260 x 336 image, cropped to 1259 x 300 (depth, x).
        geometry=Geometry(resize=(420, 84), head_patch=(42, 56), crop_offset=(0, 18)),
        model=ModelConfig(size="tiny", depth=4, split=2),
        data=DataConfig(workers=0),
        synth=SynthConfig(n_train=256, n_val=32, n_test=32, seed=0),
        train=TrainConfig(batch_size=8, epochs=8, loss="base", lr=5e-4, ema_start_epoch=5,
                          ema_decay=0.95, log_every=5),
    )
