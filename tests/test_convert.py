"""python -m fwi_jax.convert: reference state_dict (.pth, weights-only) -> params checkpoint."""

import subprocess
import sys

import jax
import numpy as np
import torch
from test_model import SMALL, seismic, small_cfg

from fwi_jax.checkpoint import load_params
from fwi_jax.model import apply_model, create_model

from torch_reference import ReferenceModel, randomize_


def run_convert(tmp_path, config: str) -> subprocess.CompletedProcess:
    """``python -m fwi_jax.convert`` of tmp_path/ref.pth under ``config`` into tmp_path/ckpt."""
    argv = [str(tmp_path / "ref.pth"), "--config", config, "--out", str(tmp_path / "ckpt")]
    return subprocess.run(
        [sys.executable, "-m", "fwi_jax.convert", *argv], capture_output=True, text=True
    )


def test_convert_cli_writes_a_loadable_params_checkpoint(tmp_path):
    cfg = small_cfg()
    ref = randomize_(ReferenceModel(cfg, pretrained_grid=False), seed=11).eval()
    torch.save({f"_orig_mod.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "ref.pth")
    cfg_file = tmp_path / "small.json"
    cfg_file.write_text(cfg.to_json())
    out = run_convert(tmp_path, str(cfg_file))
    assert out.returncode == 0, out.stderr
    loaded_cfg, params = load_params(tmp_path / "ckpt")
    assert loaded_cfg == cfg
    x = seismic((1, 6, SMALL.n_time, 31))
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    got = np.asarray(jax.jit(lambda p, a: apply_model(create_model(cfg)[0], p, a))(params, x))
    assert np.abs(got - expected).max() <= 1e-5


def test_convert_cli_wrong_config_fails_with_key_list(tmp_path):
    cfg = small_cfg()
    ref = ReferenceModel(cfg, pretrained_grid=False)
    torch.save(ref.state_dict(), tmp_path / "ref.pth")
    out = run_convert(tmp_path, "base_s6")
    assert out.returncode == 2
    assert (
        "does not fit config 'base_s6'" in out.stderr
        and "missing: blocks/0/attn/q_proj/kernel" in out.stderr
    )
    assert not (tmp_path / "ckpt").exists()


def test_reference_converts_for_a_config_with_the_error_head():
    """A reference state_dict has no error head: converted for a config with model.error_head it
    gets a fresh one, and the velocity is the one converted without it."""
    from fwi_jax.convert import convert_state_dict

    cfg = small_cfg()
    ref = randomize_(ReferenceModel(cfg, pretrained_grid=False), seed=12).eval()
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    plain, _ = convert_state_dict(state, cfg)
    head_cfg = cfg.replace(**{"model.error_head": True})
    params, _ = convert_state_dict(state, head_cfg)
    assert set(params) - set(plain) == {"error_head", "error_prior"}
    x = seismic((1, 6, SMALL.n_time, 31))
    v, s = apply_model(create_model(head_cfg)[0], params, x, log_scale=True)
    assert np.array_equal(np.asarray(v), np.asarray(apply_model(create_model(cfg)[0], plain, x)))
    assert np.allclose(s, -3.0)  # the fresh head: zero weights and the prior's start
