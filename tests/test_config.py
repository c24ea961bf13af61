"""Config loading and the shared --set option of every command."""

import argparse
import json

import pytest

from fwi_jax import demo, infer, train
from fwi_jax.config import ConfigError, add_override_argument, load_config


def test_set_takes_several_values_and_repeats():
    ap = argparse.ArgumentParser()
    add_override_argument(ap)
    args = ap.parse_args(["--set", "train.lr=1e-4", "model.dtype=bfloat16", "--set", "train.epochs=2"])
    assert args.set == ["train.lr=1e-4", "model.dtype=bfloat16", "train.epochs=2"]
    cfg = load_config("demo", args.set)
    assert (cfg.train.lr, cfg.model.dtype, cfg.train.epochs) == (1e-4, "bfloat16", 2)


@pytest.mark.parametrize("parse", [
    lambda a: train.build_parser().parse_args(["--config", "demo", *a]).set,
    lambda a: infer.build_parser().parse_args(["--data", "d", "--checkpoints", "c", "--out", "o.npz", *a]).set,
])
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
    assert load_config("demo", ["model.constant_channel_once=false"]).model.constant_channel_once is False
    with pytest.raises(ConfigError, match="constant_channel_once='maybe': expected true or false"):
        load_config("demo", ["model.constant_channel_once=maybe"])
    bad = load_config("demo").to_dict()
    bad["model"]["constant_channel_once"] = "no"  # a hand-edited JSON config
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="model.constant_channel_once='no': expected true or false"):
        load_config(str(path))
