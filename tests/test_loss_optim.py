"""Losses (reference §4) and §5 schedule, masks, loss scaling and EMA, against NumPy formulas."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fwi_jax.config import Config, ConfigError
from fwi_jax.loss import base_loss, get_loss, hard_mining_loss, mape_per_sample
from fwi_jax.optim import (
    LossScale,
    decay_mask,
    ema_update,
    learning_rate_schedule,
    make_optimizer,
    muon_labels,
)


def _pair(seed=0, shape=(2, 7, 5)):
    rng = np.random.default_rng(seed)
    v = rng.uniform(1.5, 4.5, shape).astype(np.float32)
    pred = (v * rng.uniform(0.8, 1.2, shape)).astype(np.float32)
    return pred, v


def test_base_and_hard_losses_match_numpy():
    pred, v = _pair()
    e = np.abs(pred.astype(np.float64) - v) / v
    w = np.linspace(1.0, 0.25, v.shape[1])[:, None]
    np.testing.assert_allclose(base_loss(pred, v), np.mean(e * w), rtol=1e-6)
    h = np.exp(e)
    h = h * (v.shape[1] * v.shape[2]) / h.sum(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(hard_mining_loss(pred, v), np.mean(e * w * h), rtol=1e-6)
    np.testing.assert_allclose(mape_per_sample(pred, v), e.mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(get_loss("mape")(pred, v), e.mean(), rtol=1e-6)  # no depth weight
    assert get_loss("base") is base_loss and get_loss("hard") is hard_mining_loss
    with pytest.raises(
        ConfigError, match="train.loss='l2' is not a valid choice: choose one of base, hard, mape"
    ):
        Config().replace(**{"train.loss": "l2"})  # checked when the config is made, not when used


def test_hard_mining_weights_carry_no_gradient():
    """d/dpred of mean(e*w*h) with h = stop_gradient weights: each pixel's gradient is
    sign(pred-v)/v * w * h / N, i.e. the weights scale it but are not differentiated."""
    pred, v = _pair(1)
    g = np.asarray(jax.grad(hard_mining_loss)(jnp.asarray(pred), jnp.asarray(v)), np.float64)
    e = np.abs(pred - v) / v
    h = np.exp(e) * (v.shape[1] * v.shape[2]) / np.exp(e).sum(axis=(1, 2), keepdims=True)
    w = np.linspace(1.0, 0.25, v.shape[1])[:, None]
    np.testing.assert_allclose(g, np.sign(pred - v) / v * w * h / pred.size, rtol=1e-5)


def test_schedule_constant_half_then_cosine_to_final_factor():
    tc = Config().train
    f = learning_rate_schedule(tc, total_steps=100)
    lr = np.array([f(s) for s in range(101)])
    np.testing.assert_allclose(lr[:50], tc.lr, rtol=1e-6)
    t = (np.arange(50, 101) - 50) / 50
    expected = tc.lr * (
        tc.final_lr_factor + (1 - tc.final_lr_factor) * 0.5 * (1 + np.cos(np.pi * t))
    )
    np.testing.assert_allclose(lr[50:], expected, rtol=1e-5)
    assert lr[-1] == pytest.approx(tc.lr * 1e-3, rel=1e-4)


def test_schedule_linear_warmup_then_the_reference_schedule():
    tc = dataclasses.replace(Config().train, warmup_steps=10)
    f = learning_rate_schedule(tc, total_steps=100)
    lr = np.array([f(s) for s in range(101)])
    np.testing.assert_allclose(lr[:11], tc.lr * np.arange(11) / 10, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(lr[10:50], tc.lr, rtol=1e-6)
    reference = np.array([learning_rate_schedule(Config().train, 100)(s) for s in range(101)])
    np.testing.assert_array_equal(lr[10:], reference[10:])
    # longer than the constant part: the cosine starts when the warmup ends (step 60 of 100)
    late = learning_rate_schedule(dataclasses.replace(tc, warmup_steps=60), total_steps=100)
    lr = np.array([late(s) for s in range(101)])
    np.testing.assert_allclose(lr[:61], tc.lr * np.arange(61) / 60, rtol=1e-6, atol=1e-12)
    t = (np.arange(60, 101) - 60) / 40
    cosine = tc.final_lr_factor + (1 - tc.final_lr_factor) * 0.5 * (1 + np.cos(np.pi * t))
    np.testing.assert_allclose(lr[60:], tc.lr * cosine, rtol=1e-5)
    # longer than the run (the demo's 64 steps in a one-epoch trial): still rising at the end
    long = learning_rate_schedule(dataclasses.replace(tc, warmup_steps=150), total_steps=100)
    np.testing.assert_allclose(
        [long(s) for s in range(101)], tc.lr * np.arange(101) / 150, rtol=1e-6
    )
    with pytest.raises(ConfigError, match="warmup_steps=-1"):
        learning_rate_schedule(dataclasses.replace(tc, warmup_steps=-1), total_steps=100)


def test_weight_decay_only_on_matrices():
    params = {
        "blocks": {
            "0": {
                "attn": {"qkv": {"kernel": jnp.ones((4, 12))}, "q_bias": jnp.ones(4)},
                "norm1": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
            }
        },
        "pos_embed": jnp.ones((1, 5, 4)),
        "cls_token": jnp.ones((1, 1, 4)),
        "patch_embed": {"proj": {"kernel": jnp.ones((9, 4))}},
    }
    m = decay_mask(params)
    assert m["blocks"]["0"]["attn"]["qkv"]["kernel"] and m["patch_embed"]["proj"]["kernel"]
    assert not any(
        [
            m["blocks"]["0"]["attn"]["q_bias"],
            m["blocks"]["0"]["norm1"]["scale"],
            m["blocks"]["0"]["norm1"]["bias"],
            m["pos_embed"],
            m["cls_token"],
        ]
    )
    # with a zero gradient, AdamW shrinks only the decayed leaves
    tx, _ = make_optimizer(Config(), total_steps=10)
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    new = optax.apply_updates(params, updates)
    assert float(new["blocks"]["0"]["attn"]["qkv"]["kernel"][0, 0]) < 1.0
    assert (
        float(new["pos_embed"][0, 0, 0]) == 1.0
        and float(new["blocks"]["0"]["norm1"]["scale"][0]) == 1.0
    )


def test_muon_runs_on_model_shaped_params():
    params = {"w": jnp.ones((8, 4)) + jnp.eye(8, 4), "b": jnp.ones(4)}
    tx, _ = make_optimizer(Config().replace(**{"train.optimizer": "muon"}), total_steps=10)
    grads = {"w": jnp.arange(32.0).reshape(8, 4) / 32, "b": jnp.ones(4)}
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(
        bool(jnp.all(jnp.isfinite(u))) and float(jnp.abs(u).sum()) > 0
        for u in jax.tree.leaves(updates)
    )
    with pytest.raises(ConfigError, match="train.optimizer='sgd' is not a valid choice"):
        Config().replace(**{"train.optimizer": "sgd"})  # before make_optimizer could see it


def test_muon_split_follows_the_reference():
    """Muon for the 2-D weight matrices (head included), Adam for the rest; the patch embedding,
    a 4-D convolution weight in the reference, goes to Adam although ours is 2-D."""
    params = {
        "blocks": {
            "0": {
                "attn": {"qkv": {"kernel": jnp.ones((4, 12))}, "q_bias": jnp.ones(4)},
                "norm1": {"scale": jnp.ones(4)},
            }
        },
        "head": {"kernel": jnp.ones((4, 9)), "bias": jnp.ones(9)},
        "pos_embed": jnp.ones((1, 5, 4)),
        "cls_token": jnp.ones((1, 1, 4)),
        "patch_embed": {"proj": {"kernel": jnp.ones((9, 4)), "bias": jnp.ones(4)}},
    }
    labels = muon_labels(params)
    muon = {
        jax.tree_util.keystr(p)
        for p, label in jax.tree_util.tree_leaves_with_path(labels)
        if label == "muon"
    }
    assert muon == {"['blocks']['0']['attn']['qkv']['kernel']", "['head']['kernel']"}
    with pytest.raises(ConfigError, match="train.muon_ns_dtype='float16' is not a valid choice"):
        Config().replace(**{"train.optimizer": "muon", "train.muon_ns_dtype": "float16"})


def test_dynamic_loss_scale_halves_on_overflow_and_grows_after_interval():
    ls = LossScale.create(dynamic=True)
    assert float(ls.scale) == 2.0**16
    ls = ls.adjust(jnp.bool_(False))
    assert float(ls.scale) == 2.0**15 and int(ls.skipped) == 1 and int(ls.good_steps) == 0
    for _ in range(LossScale.GROWTH_INTERVAL - 1):
        ls = ls.adjust(jnp.bool_(True))
    assert float(ls.scale) == 2.0**15
    ls = ls.adjust(jnp.bool_(True))
    assert float(ls.scale) == 2.0**16 and int(ls.good_steps) == 0 and int(ls.skipped) == 1
    static = LossScale.create(dynamic=False).adjust(jnp.bool_(False))
    assert float(static.scale) == 1.0 and int(static.skipped) == 1


def test_ema_starts_as_copy_then_decays():
    # params before step s
    p = [jnp.float32(0.0), jnp.float32(1.0), jnp.float32(2.0), jnp.float32(3.0)]
    ema = jnp.float32(-7.0)  # placeholder before the start
    ema = ema_update(ema, p[0], p[1], jnp.int32(0), start_step=1, decay=0.9)
    assert float(ema) == -7.0
    ema = ema_update(ema, p[1], p[2], jnp.int32(1), start_step=1, decay=0.9)
    assert float(ema) == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    ema = ema_update(ema, p[2], p[3], jnp.int32(2), start_step=1, decay=0.9)
    assert float(ema) == pytest.approx(0.9 * (0.9 * 1.0 + 0.1 * 2.0) + 0.1 * 3.0)
