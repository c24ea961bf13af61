"""CPU-sized demo: the whole code path on synthetic data, a reduced input grid and a 4-block EVA02.

Command:
    python -m fwi_jax.demo                        # synth, 2 members, ensemble + TTA, plots
    python -m fwi_jax.train --config demo --workdir runs/demo_member    # one member only

Reproduces: nothing of the reference; it runs the pipeline end to end with no downloads. With no
`data.root` it synthesises a competition-format dataset (fwi_jax.synth, cached), trains for 8
epochs and still predicts full-size 1259 x 300 models. lr is 5e-4: at 1e-3 the output sigmoid
saturated for two of four seeds and never recovered (the train loop warns when that happens).
Expected result: held-out MAPE of the 2-member ensemble with flip TTA 0.0755, against 0.0871 for
the mean-velocity-profile baseline (2026-12-01, 2-core AMD EPYC CPU); the CPU's summation order
moves the last digits.
Cost: 9 min 35 s for `python -m fwi_jax.demo` from a fresh clone, the install included (same date
and machine); the synthetic data are cached for later runs.
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
        train=TrainConfig(
            batch_size=8,
            epochs=8,
            loss="base",
            lr=5e-4,
            ema_start_epoch=5,
            ema_decay=0.95,
            log_every_steps=5,
        ),
    )
