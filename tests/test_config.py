"""Config loading and the shared --set option of every command."""

import argparse
import json
import pathlib
import subprocess
import sys

import pytest

from fwi_jax import demo, infer, train
from fwi_jax.config import (
    CHOICES,
    RENAMED,
    Config,
    ConfigError,
    add_override_argument,
    from_dict,
    load_config,
)

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_set_takes_several_values_and_repeats():
    ap = argparse.ArgumentParser()
    add_override_argument(ap)
    args = ap.parse_args(
        ["--set", "train.lr=1e-4", "model.dtype=bfloat16", "--set", "train.epochs=2"]
    )
    assert args.set == ["train.lr=1e-4", "model.dtype=bfloat16", "train.epochs=2"]
    cfg = load_config("demo", args.set)
    assert (cfg.train.lr, cfg.model.dtype, cfg.train.epochs) == (1e-4, "bfloat16", 2)


@pytest.mark.parametrize(
    "parse",
    [
        lambda a: train.build_parser().parse_args(["--config", "demo", *a]).set,
        lambda a: (
            infer.build_parser()
            .parse_args(["--data", "d", "--checkpoints", "c", "--out", "o.npz", *a])
            .set
        ),
    ],
)
def test_commands_keep_every_override(parse):
    # an earlier nargs="*" option kept only the last --set: every command now shares one definition
    assert parse(["--set", "a=1", "b=2", "--set", "c=3"]) == ["a=1", "b=2", "c=3"]


def test_demo_rejects_unknown_keys(capsys):
    assert demo.main(["--set", "train.no_such_key=1"]) == 2
    assert "unknown config key 'train.no_such_key'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no_such"):
        load_config("demo", ["model.no_such=1"])


def test_constant_channel_once_parses_and_is_checked_at_load(tmp_path):
    assert load_config("demo").model.constant_channel_once is True
    assert (
        load_config("demo", ["model.constant_channel_once=false"]).model.constant_channel_once
        is False
    )
    with pytest.raises(ConfigError, match="constant_channel_once='maybe': expected true or false"):
        load_config("demo", ["model.constant_channel_once=maybe"])
    bad = load_config("demo").to_dict()
    bad["model"]["constant_channel_once"] = "no"  # a hand-edited JSON config
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(
        ConfigError, match="model.constant_channel_once='no': expected true or false"
    ):
        load_config(str(path))


def _commands(tmp_path):
    """Each command's argv up to --set: every one would run if its config were good."""
    return {
        "train": (
            train.main,
            ["--config", "demo", "--workdir", str(tmp_path / "run"), "--no-progress"],
        ),
        "infer": (
            infer.main,
            [
                "--data",
                str(tmp_path),
                "--checkpoints",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "sub.npz"),
                "--no-progress",
            ],
        ),
        "demo": (demo.main, ["--workdir", str(tmp_path / "demo"), "--no-progress"]),
    }


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_misspelt_choice_is_one_error_line_naming_the_choices(key, tmp_path, capsys):
    for name, (main, argv) in _commands(tmp_path).items():
        assert main([*argv, "--set", f"{key}=nonsense"]) == 2, name
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {key}='nonsense'"), (name, lines)
        assert lines[0].endswith("choose one of " + ", ".join(CHOICES[key])), (name, lines)
        assert not (tmp_path / "run").exists() and not (tmp_path / "demo").exists()  # nothing ran


@pytest.mark.parametrize("command", ["train", "infer", "demo"])
def test_misspelt_optimizer_exits_2_without_traceback(command, tmp_path):
    _, argv = _commands(tmp_path)[command]
    proc = subprocess.run(
        [sys.executable, "-m", f"fwi_jax.{command}", *argv, "--set", "train.optimizer=adamx"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: train.optimizer='adamx' is not a valid choice: choose one of adamw, muon"
    ]


def test_choices_match_the_code_that_acts_on_them():
    from fwi_jax import loss, optim
    from fwi_jax.model import attention, eva02, fwi, onednn
    from fwi_jax.synth import geology, profiles, wave

    assert set(CHOICES["model.size"]) == set(eva02.SIZES)
    assert set(CHOICES["model.dtype"]) == set(fwi.DTYPES)
    assert set(CHOICES["model.remat"]) == {"none", *fwi.REMAT_POLICIES}
    assert set(CHOICES["model.attention"]) == set(attention.IMPLEMENTATIONS)
    assert set(CHOICES["model.dense"]) == set(onednn.IMPLEMENTATIONS)
    assert set(CHOICES["synth.families"]) == set(geology.FAMILIES)
    assert set(CHOICES["synth.mode"]) == set(wave.MODES)
    assert set(CHOICES["synth.profile"]) == set(profiles.PROFILES)
    assert set(CHOICES["train.loss"]) == set(loss.LOSSES)
    assert set(CHOICES["train.muon_ns_dtype"]) == set(optim.MUON_NS_DTYPES)
    for key, allowed in CHOICES.items():  # every default is a valid choice
        section, name = key.split(".")
        default = getattr(getattr(Config(), section), name)
        assert set(default if isinstance(default, tuple) else (default,)) <= set(allowed), key


def test_renamed_keys_read_from_saved_configs_and_named_on_the_command_line():
    saved = Config().to_dict()
    for old, new in RENAMED.items():
        section, new_name = new.split(".")
        saved[section][old.split(".")[1]] = saved[section].pop(new_name) + 3
        with pytest.raises(ConfigError, match=f"is now '{new}'"):
            load_config("demo", [f"{old}=1"])
    cfg = from_dict(saved)
    for new in RENAMED.values():
        section, name = new.split(".")
        assert getattr(getattr(cfg, section), name) == getattr(getattr(Config(), section), name) + 3
