"""Typed run configuration: geometry, model, data, training.

A config is a frozen dataclass tree. Named configs are Python files in the repository's
``configs/`` folder, each with a ``get_config()`` and a docstring that states the command, what it
reproduces, its cost and its expected result (the big_vision convention). ``load_config`` finds a
config by name (``tiny_s8``) or by path (``configs/tiny_s8.py``) and applies ``key=value``
overrides (``train.lr=1e-4``, ``model.dtype=bfloat16``, ``geometry.resize=(630,154)``).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import pathlib
import types
import typing
from typing import Any

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config name, path, key or value that cannot be used; the message says what to do."""


# Every string setting with a fixed set of values, and those values: checked whenever a config is
# loaded or changed (`Config.validate`), so a misspelt value fails before any work, naming the
# choices. The modules that act on a setting take its values from here (tests/test_config.py
# holds the model's and the simulator's tables to these lists).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.size": ("tiny", "small", "base", "large"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attention": (
        "auto",
        "xla",
        "cudnn",
        "blockwise",
        "query_blocks",
        "fused_cpu",
        "onednn",
    ),
    "model.dense": ("auto", "xla", "onednn"),
    "model.remat": ("none", "full", "dots"),
    "model.fusion": ("mean", "mha_single", "mha_dual"),
    "geometry.head": ("pixel_shuffle", "token_linear"),
    "geometry.time_resample": ("drop_last", "area"),
    "data.host_dtype": ("store", "float32"),
    "synth.families": ("layered", "faulted", "salt"),  # each of the tuple's entries
    "synth.mode": ("fast", "full"),
    "synth.profile": ("cpml8", "devito"),
    "train.loss": ("base", "hard", "mape"),
    "train.schedule": ("constant_then_cosine", "periodic_cosine_then_constant"),
    "train.optimizer": ("adamw", "muon"),
    "train.loss_scale": ("auto", "dynamic", "none"),
    "train.muon_ns_dtype": ("bfloat16", "float32"),
}
# Keys renamed since configs were saved with them: a saved config.json (runs, params
# checkpoints) is read under the new name; on the command line the old name is an error naming
# the new one.
RENAMED = {
    "train.log_every": "train.log_every_steps",
    "train.val_every": "train.val_every_epochs",
    "train.checkpoint_every": "train.checkpoint_every_steps",
}
HEADS = CHOICES["geometry.head"]
FUSIONS = CHOICES["model.fusion"]


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Input and output grids (reference §2-§3). Reduced grids keep the code path of the full one.

    Seismic model input: (6 channels, n_time, n_receivers) -> fold -> (n_time/fold,
    n_receivers*fold) -> bilinear resize to ``resize`` (H, W) -> patches of ``patch`` px ->
    token grid (H/patch, W/patch). Head: each token emits ``head_patch`` pixels ->
    (grid_h*head_h, grid_w*head_w) -> crop ``out_shape`` (depth, x) at ``crop_offset``.
    ``head=token_linear`` instead: each token emits ``out_shape[1]`` values (x) and the token axis
    is area-resized to ``out_shape[0]`` (depth). ``channels=5`` drops the zero channel in the model;
    ``flip_channels`` says whether the flip (TTA, augmentation) reverses channels besides receivers.
    """

    n_time: int = 10000
    n_receivers: int = 31
    fold: int = 10
    resize: tuple[int, int] = (1260, 308)
    patch: int = 14
    head_patch: tuple[int, int] = (14, 14)
    out_shape: tuple[int, int] = (1259, 300)
    crop_offset: tuple[int, int] = (0, 4)
    # model-side input and output layout (the first place's models: 5, 0.1, token_linear, False)
    channels: int = 6  # 6: the input as given, zero channel 151 included | 5: zero channel dropped
    input_scale: float = 1.0  # multiplies the input amplitudes (already scaled by 1e4) in the model
    # t-power gain in the model: sample t of every trace times (2 (t + 0.5) / n_time) ** time_power
    # (1 at mid-record), lifting late, weak reflections against the direct wave; 0 = none
    time_power: float = 0.0
    head: str = "pixel_shuffle"  # pixel_shuffle (head_patch px per token, crop) | token_linear
    flip_channels: bool = True  # the flip (TTA, augmentation) reverses channels besides receivers
    # the files' 10001 time samples -> n_time, on the host (`preprocess.resample_time`):
    # drop_last (the reference) | area (PyTorch's area interpolation, the first place's input)
    time_resample: str = "drop_last"

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (rows, cols)."""
        return (self.resize[0] // self.patch, self.resize[1] // self.patch)

    def validate(self) -> None:
        h, w = self.resize
        if self.n_time % self.fold:
            raise ConfigError(
                f"geometry.n_time={self.n_time} is not a multiple of geometry.fold={self.fold}"
            )
        if h % self.patch or w % self.patch:
            raise ConfigError(
                f"geometry.resize={self.resize} is not a multiple of geometry.patch={self.patch}"
            )
        if self.channels not in (5, 6):
            raise ConfigError(
                f"geometry.channels={self.channels}: choose 6 (zero channel kept) or 5"
            )
        if self.head not in HEADS:
            raise ConfigError(f"geometry.head={self.head!r}: choose one of {', '.join(HEADS)}")
        if self.head == "token_linear":
            return  # every token -> out_shape[1] values, area-resized over tokens to out_shape[0]
        gh, gw = self.grid
        oh, ow = gh * self.head_patch[0], gw * self.head_patch[1]
        if (
            self.crop_offset[0] + self.out_shape[0] > oh
            or self.crop_offset[1] + self.out_shape[1] > ow
        ):
            raise ConfigError(
                f"geometry: the head makes a {oh}x{ow} image (grid {gh}x{gw} x head_patch "
                f"{self.head_patch}); "
                f"cropping {self.out_shape} at {self.crop_offset} does not fit. Enlarge "
                "head_patch or resize."
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """EVA02 split model (reference §3). ``size``: timm's widths; dim/depth/heads override them."""

    size: str = "tiny"  # tiny | small | base | large
    split: int = 8  # blocks [0, split) run per channel, then channel fusion, then the rest
    fusion: str = "mean"  # mean | mha_single | mha_dual (attention across channels per token)
    fusion_heads: int = 4  # heads of the cross-channel attention (mha_single, mha_dual)
    fusion_query_heads: int = 2  # heads of mha_dual's attention from a learned query
    dim: int | None = None
    depth: int | None = None
    heads: int | None = None
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16 (params stay float32)
    # auto | xla | cudnn | blockwise | query_blocks | fused_cpu | onednn (fwi_jax.model.attention)
    attention: str = "auto"
    # key block of blockwise, query block of query_blocks / fused_cpu (None: per impl and pass)
    attention_block: int | None = None
    # the dense layers' forward product: auto | xla | onednn (fwi_jax.model.onednn)
    dense: str = "auto"
    remat: str = "none"  # none | full | dots (rematerialisation policy per block)
    # run each block stack (before and after the split) as one lax.scan over stacked weights, so
    # that remat bounds memory on any backend: XLA:CPU schedules an unrolled stack's recomputed
    # blocks early and keeps them all, a scan recomputes one block per loop iteration
    scan_blocks: bool = False
    ref_feat_shape: tuple[int, int] = (16, 16)  # RoPE reference grid (timm)
    v_min: float = 1.5  # km/s; output = sigmoid(.) * v_span + v_min
    v_span: float = 3.0
    # a trained logit-space bias per output depth row, added before the sigmoid; a fresh run
    # starts it at the training set's mean velocity profile (`fwi_jax.train.depth_profile`), so
    # the network starts at the mean-profile baseline and learns the deviations from it. False:
    # the reference's head
    depth_prior: bool = False
    # the all-zero channel 151 through blocks[:split] once per parameter set instead of once per
    # sample (its tokens depend on the parameters alone; `preprocess.shot_channels`); false: the
    # reference's computation, channel 151 run like the shots. Applies to six-channel models with
    # mean fusion only (fwi_jax.model.fwi.constant_once)
    constant_channel_once: bool = True
    # a second head beside the velocity's: per pixel, the log-scale s = log b of a Laplace
    # distribution of the relative error |pred - v| / v, trained with train.nll_weight x its
    # negative log-likelihood on the tokens, their gradient stopped (the velocity is trained as
    # without it) unless model.error_head_joint, and
    # read by ``python -m fwi_jax.infer --uncertainty`` (fwi_jax.uncertainty). False: the
    # reference's network, its parameters and checkpoints unchanged
    error_head: bool = False
    # the error head's likelihood also trains the backbone (its gradient reaches the tokens)
    error_head_joint: bool = False

    def validate(self) -> None:
        for key in ("error_head", "error_head_joint"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"model.{key}={getattr(self, key)!r}: expected true or false")
        if not isinstance(self.constant_channel_once, bool):
            raise ConfigError(
                f"model.constant_channel_once={self.constant_channel_once!r}: "
                "expected true or false"
            )
        if not isinstance(self.depth_prior, bool):
            raise ConfigError(f"model.depth_prior={self.depth_prior!r}: expected true or false")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"model.fusion={self.fusion!r}: choose one of {', '.join(FUSIONS)}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where samples come from and how they are loaded (reference §1).

    ``host_dtype``: the dtype of x in the host batches the loader hands over.
    "store" (default): as stored, so float16 for a float16 packed store (``python -m fwi_jax.data
    pack --float16``) and float32 for folders and float32 stores; the loader only copies (half the
    bytes of float32), and the jitted train/eval/infer programs cast x to float32 on the device
    (the model's first operation, `FWIModel.__call__`). float16 -> float32 is exact, so results are
    bit-identical to "float32". "float32": the loader converts float16 to float32 on the host
    (slower: twice the bytes written and sent to the device); for code of your own that needs
    float32 NumPy batches."""

    root: str = ""  # folder of sample folders, or a packed store made by `fwi_jax.data pack`
    train_list: str = ""  # text file, one sample id per line ("" = every sample under root)
    val_list: str = ""
    workers: int = 0  # grain worker processes
    prefetch: int = 2  # batches buffered per worker
    flip_p: float = 0.5  # horizontal-flip augmentation probability in training (reference §2.4)
    v_range: tuple[float, float] = (0.5, 10.0)  # km/s; velocities outside fail validation
    # x in host batches: store (float16 stays float16) | float32 (see above)
    host_dtype: str = "store"


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Synthetic dataset the run makes for itself when ``data.root`` is empty (demo, tests)."""

    n_train: int = 0
    n_val: int = 0  # validation during training (best checkpoint)
    n_test: int = 0  # held out for the final ensemble evaluation (fwi_jax.demo)
    families: tuple[str, ...] = ("layered", "faulted", "salt")
    mode: str = "fast"  # solver mode of the cpml8 profile: fast | full
    profile: str = "cpml8"  # generator profile: cpml8 | devito (fwi_jax.synth.profiles)
    seed: int = 0
    cache_dir: str = "~/.cache/fwi_jax/synth"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe (reference §4-§5)."""

    batch_size: int = 8  # global batch, independent of the device count
    epochs: int = 40
    steps_per_epoch: int | None = None  # None = len(train set) // batch_size
    loss: str = "base"  # base | hard (hard-example mining) | mape (no depth weight)
    optimizer: str = "adamw"  # adamw | muon
    lr: float = 2e-4
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.01
    muon_momentum: float = 0.95
    # Muon's Newton-Schulz steps: bfloat16 (the reference) | float32
    muon_ns_dtype: str = "bfloat16"
    # learning rate per step (fwi_jax.optim.learning_rate_schedule):
    # constant_then_cosine (the reference): lr for constant_fraction of the steps, then a cosine
    #   to lr * final_lr_factor at the last step, after an optional linear warmup;
    # periodic_cosine_then_constant (the first place): lr_min + (lr - lr_min)(1 + cos(pi t /
    #   cosine_half_period_steps)) / 2, which falls and rises again with a period of twice
    #   cosine_half_period_steps, until epoch constant_from_epoch; from there lr * constant_factor
    schedule: str = "constant_then_cosine"
    # linear lr warmup from 0 over this many steps (0 = the reference recipe); one longer than
    # the constant part delays the cosine until it ends
    warmup_steps: int = 0
    constant_fraction: float = 0.5  # lr multiplier 1.0 for this share of steps, then cosine
    final_lr_factor: float = 1e-3
    cosine_half_period_steps: int = 100  # periodic_cosine_then_constant: steps from lr to lr_min
    lr_min: float = 0.0  # periodic_cosine_then_constant: the cosine's lowest lr
    constant_from_epoch: int = 0  # periodic_cosine_then_constant: first epoch of the constant lr
    constant_factor: float = 1.0  # periodic_cosine_then_constant: the constant lr is lr x this
    # global-norm gradient clipping threshold, on the unscaled gradients (optax's
    # clip_by_global_norm); 0 = no clipping (the reference's choice); the norm is logged anyway
    clip_norm: float = 0.0
    grad_accum: int = 1
    loss_scale: str = "auto"  # auto (dynamic for float16) | dynamic | none
    ema_start_epoch: int = 20
    ema_decay: float = 0.99
    val_tta: bool = False
    val_every_epochs: int = 1
    # stop after this many validations in a row whose MAPE is above the best so far (a tie
    # counts as no worse); 0 = never stop early. The count is kept in the train-state checkpoint
    early_stop_patience: int = 0
    keep_checkpoints: int = 2
    # weight of the error head's Laplace negative log-likelihood in the loss (model.error_head);
    # its gradient reaches the error head only, so under Adam the weight matters little, and
    # small keeps gradient clipping (train.clip_norm) seeing the velocity's gradients
    nll_weight: float = 0.1
    checkpoint_every_steps: int = 0  # train-state checkpoints besides each epoch's end (0 = none)
    log_every_steps: int = 10
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "custom"
    geometry: Geometry = Geometry()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    synth: SynthConfig = SynthConfig()
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **overrides: Any) -> Config:
        """``cfg.replace(**{"train.lr": 1e-4})`` with dotted keys and already-typed values; the
        result is validated (`validate`)."""
        cfg = self
        for key, value in overrides.items():
            cfg = _set(cfg, key.split("."), value, key)
        return cfg.validate()

    def validate(self) -> Config:
        """Raise `ConfigError` for a value outside its `CHOICES` or a geometry that does not fit;
        returns the config."""
        for key, allowed in CHOICES.items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            for v in value if isinstance(value, tuple) else (value,):
                if v not in allowed:
                    raise ConfigError(
                        f"{key}={v!r} is not a valid choice: choose one of {', '.join(allowed)}"
                    )
        self.geometry.validate()
        self.model.validate()
        return self


def from_dict(d: dict[str, Any], cls: type = Config) -> Any:
    """Inverse of ``Config.to_dict``; unknown keys fail with their name."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        for old, new in RENAMED.items():  # a config saved under an old key
            section, old_name = old.split(".")
            if cls is _SECTIONS.get(section) and key == old_name:
                key = new.split(".")[1]
        if key not in hints:
            raise ConfigError(f"unknown config key {key!r} for {cls.__name__}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            value = from_dict(value, hints[key])
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


_SECTIONS = typing.get_type_hints(Config)  # "train" -> TrainConfig ...


def _field_names(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _set(obj: Any, path: list[str], value: Any, full: str) -> Any:
    head, rest = path[0], path[1:]
    if not dataclasses.is_dataclass(obj) or head not in _field_names(obj):
        where = type(obj).__name__
        options = ", ".join(_field_names(obj)) if dataclasses.is_dataclass(obj) else "none"
        raise ConfigError(
            f"unknown config key {full!r}: {where} has no field {head!r} (fields: {options})"
        )
    current = getattr(obj, head)
    new = _set(current, rest, value, full) if rest else value
    return dataclasses.replace(obj, **{head: new})


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    """Parse ``text`` into the type of the field (``int``, ``tuple[int, int]``, ``str | None``
    ...)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text in ("None", "none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse_value(text, inner[0], key)
    if annotation is str:
        return text
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected true or false")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if origin is tuple and args and args[0] is str:
            return tuple(s.strip() for s in text.split(",") if s.strip())
        raise ConfigError(f"{key}={text!r}: not a valid {annotation}") from None
    if annotation is float and isinstance(value, (int, float)):
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = (value,)
        if isinstance(value, (list, tuple)):
            return tuple(value)
    raise ConfigError(f"{key}={text!r}: expected {annotation}")


def _annotation(cfg: Config, key: str) -> Any:
    if key in RENAMED:
        raise ConfigError(f"config key {key!r} is now {RENAMED[key]!r}")
    obj: Any = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or part not in _field_names(obj):
            raise ConfigError(f"unknown config key {key!r}")
        obj = getattr(obj, part)
    if not dataclasses.is_dataclass(obj) or parts[-1] not in _field_names(obj):
        fields = ", ".join(_field_names(obj)) if dataclasses.is_dataclass(obj) else ""
        raise ConfigError(f"unknown config key {key!r} (valid here: {fields})")
    return typing.get_type_hints(type(obj))[parts[-1]]


def add_override_argument(parser) -> None:
    """The ``--set KEY=VALUE ...`` option every command shares: several values after one ``--set``,
    or ``--set`` repeated; all of them apply, in order."""
    parser.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. --set train.lr=1e-4 model.dtype=bfloat16 (repeatable)",
    )


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``["train.lr=1e-4", ...]`` from the command line, parsing each value by field type;
    the result is validated (`Config.validate`)."""
    values = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)"
            )
        key, text = item.split("=", 1)
        key = key.strip()
        values.pop(key, None)  # the last value of a key counts, in its order
        values[key] = _parse_value(text.strip(), _annotation(cfg, key), key)
    return cfg.replace(**values)


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve ``tiny_s8`` (a file in ``configs/``) or a path to a config ``.py`` or ``.json``."""
    path = pathlib.Path(name_or_path).expanduser()
    if not (path.suffix in (".py", ".json") and path.exists()):
        path = CONFIG_DIR / f"{name_or_path}.py"
        if not path.exists():
            raise ConfigError(
                f"unknown config {name_or_path!r}: not a file, and not a name in {CONFIG_DIR}. "
                f"Available: {', '.join(available_configs())}"
            )
    if path.suffix == ".json":
        cfg = from_dict(json.loads(path.read_text()))
    else:
        spec = importlib.util.spec_from_file_location(f"fwi_jax_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {path} defines no get_config()")
        cfg = module.get_config()
    return apply_overrides(cfg, overrides)  # validated
