"""Training trajectories against PyTorch: our jitted step (``fwi_jax.train.make_train_step``) and
the PyTorch reference model trained side by side from the same weights on the same batches, with
the reference's loss (hard mining), schedule (constant half, then cosine) and EMA.

- ``train.optimizer=muon`` against the reference's MuonWithAuxAdam (rewritten in
  ``torch_reference.ReferenceMuonWithAuxAdam``), Newton-Schulz in float32 on both sides;
- ``train.optimizer=adamw`` against ``torch.optim.AdamW`` with our decay mask as parameter groups.

A 2-block tiny model (width 192) on a reduced grid (4 x 3 tokens) keeps each run short; most of
its time is compiling the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from test_model import SMALL

from fwi_jax import train as T
from fwi_jax.config import load_config
from fwi_jax.convert import convert_state_dict
from fwi_jax.model import create_model
from fwi_jax.optim import make_optimizer, newton_schulz, reference_muon
from fwi_jax.preprocess import ZERO_CHANNEL

from torch_reference import (
    ReferenceModel,
    ReferenceMuonWithAuxAdam,
    randomize_,
    reference_hard_loss,
    reference_lr_multiplier,
)
from torch_reference import newton_schulz as torch_newton_schulz

STEPS, CYCLE, EMA_START, EMA_DECAY, BATCH = 20, 4, 8, 0.9, 2


@pytest.fixture(autouse=True)
def one_torch_thread():
    """PyTorch on one thread: these small matrices gain nothing from more, and on a busy machine
    its thread pool's waits cost seconds per step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trajectory_cfg(optimizer: str):
    return load_config("tiny_s8").replace(
        geometry=SMALL,
        **{
            "model.depth": 2,
            "model.split": 1,
            "train.loss": "hard",
            "train.optimizer": optimizer,
            "train.muon_ns_dtype": "float32",
            "train.ema_decay": EMA_DECAY,
        },
    )


def batches():
    """STEPS batches, CYCLE distinct ones in turn: random gathers with the zero channel 151 in
    place (as preprocessing makes it), velocities rising with depth from a random surface value."""
    rng = np.random.default_rng(0)
    depth = np.linspace(0.0, 1.5, SMALL.out_shape[0], dtype=np.float32)[None, :, None]
    distinct = []
    for _ in range(CYCLE):
        x = rng.standard_normal((BATCH, 6, SMALL.n_time, SMALL.n_receivers)).astype(np.float32)
        x[:, ZERO_CHANNEL] = 0.0
        v = (
            1.8
            + rng.uniform(0, 1, (BATCH, 1, 1)).astype(np.float32)
            + depth
            + np.zeros(SMALL.out_shape, np.float32)
        )
        distinct.append((x, v))
    return [distinct[i % CYCLE] for i in range(STEPS)]


def to_ours(ref_or_state, cfg):
    """A torch model or {name: tensor} state -> our params tree."""
    state = ref_or_state.state_dict() if isinstance(ref_or_state, torch.nn.Module) else ref_or_state
    return convert_state_dict({k: v.detach().numpy().copy() for k, v in state.items()}, cfg)[0]


def run_jax(cfg, params):
    graphdef = create_model(cfg)[0]
    tx, schedule = make_optimizer(cfg, STEPS)
    state = T.create_train_state(cfg, params, tx)
    step = jax.jit(T.make_train_step(cfg, graphdef, tx, schedule, ema_start_step=EMA_START))
    losses = []
    for x, v in batches():
        state, metrics = step(state, {"x": jnp.asarray(x), "v": jnp.asarray(v)})
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state["params"]), jax.device_get(state["ema"])


def run_torch(cfg, ref, opt):
    """The reference loop: loss, backward, step at lr(step), then the EMA (created at EMA_START as a
    copy of the weights before that step, then ema <- d ema + (1 - d) params after each step)."""
    lr = cfg.train.lr
    losses, ema = [], None
    for i, (x, v) in enumerate(batches()):
        if i == EMA_START:
            ema = {k: t.detach().clone() for k, t in ref.state_dict().items()}
        for group in opt.param_groups:
            group["lr"] = lr * reference_lr_multiplier(i, STEPS, cfg.train.final_lr_factor)
        loss = reference_hard_loss(ref(torch.from_numpy(x)), torch.from_numpy(v))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for k, t in ref.state_dict().items():
                    ema[k].mul_(EMA_DECAY).add_(t, alpha=1 - EMA_DECAY)
        losses.append(loss.item())
    return np.array(losses), ema


def assert_trajectories_agree(cfg, make_torch_optimizer, param_tol):
    """Per-step losses within 1e-4 relative: the two float32 gradients differ only in summation
    order (the losses agree to about 1e-6). Final params and EMA, per tensor:
    ||ours - theirs|| <= param_tol ||theirs - initial||, the distance moved agreeing to param_tol.
    Adam passes a gradient's relative error on to its step about 1:1, so the tensors with the
    smallest gradients (the norm scales) agree least, to about 3e-4 after 20 steps; 2e-3 leaves
    room for that, while a wrong rule (Muon's update scale, which weights take Muon, a Nesterov
    Adam, bias-corrected momentum) puts some tensor 1e-2 to 1 of its distance off."""
    torch.manual_seed(0)
    ref = randomize_(ReferenceModel(cfg, pretrained_grid=False), seed=7).train()
    init = to_ours(ref, cfg)
    jax_losses, jax_params, jax_ema = run_jax(cfg, init)
    torch_losses, torch_ema = run_torch(cfg, ref, make_torch_optimizer(ref))
    print("\nstep  loss (ours)   loss (PyTorch)  rel. diff")
    for i, (a, b) in enumerate(zip(jax_losses, torch_losses)):
        print(f"{i:4d}  {a:.7f}    {b:.7f}       {abs(a - b) / b:.1e}")
    first, last = torch_losses[:CYCLE].mean(), torch_losses[-CYCLE:].mean()
    assert last < 0.99 * first, (first, last)  # it trains: the comparison is not of a standstill
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-4)
    for name, ours, theirs in (
        ("params", jax_params, to_ours(ref, cfg)),
        ("ema", jax_ema, to_ours(torch_ema, cfg)),
    ):
        flat_theirs = dict(jax.tree_util.tree_leaves_with_path(theirs))
        flat_init = dict(jax.tree_util.tree_leaves_with_path(init))
        for path, a in jax.tree_util.tree_leaves_with_path(ours):
            moved = np.linalg.norm(flat_theirs[path] - flat_init[path])
            err = np.linalg.norm(np.asarray(a) - flat_theirs[path])
            assert err <= param_tol * moved, (name, jax.tree_util.keystr(path), err / moved)


def test_muon_trajectory_matches_reference_muon_with_aux_adam():
    cfg = trajectory_cfg("muon")
    tc = cfg.train
    assert_trajectories_agree(
        cfg,
        lambda ref: ReferenceMuonWithAuxAdam(
            ref.parameters(),
            lr=tc.lr,
            weight_decay=tc.weight_decay,
            momentum=tc.muon_momentum,
            betas=(tc.b1, tc.b2),
            ns_dtype=torch.float32,
        ),
        param_tol=2e-3,
    )


def test_adamw_trajectory_matches_torch_adamw():
    cfg = trajectory_cfg("adamw")
    tc = cfg.train

    def adamw(ref):
        decayed = lambda n, p: p.ndim >= 2 and not n.endswith(("pos_embed", "cls_token"))
        groups = [
            {
                "params": [p for n, p in ref.named_parameters() if decayed(n, p)],
                "weight_decay": tc.weight_decay,
            },
            {
                "params": [p for n, p in ref.named_parameters() if not decayed(n, p)],
                "weight_decay": 0.0,
            },
        ]
        return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.b1, tc.b2), eps=1e-8)

    assert_trajectories_agree(cfg, adamw, param_tol=2e-3)


def test_muon_steps_match_reference_on_one_matrix():
    """Three steps of ``reference_muon`` on a weight matrix (ours (in, out), PyTorch's (out, in))
    and a bias, against the PyTorch rewrite, Newton-Schulz in float32: within 1e-5 of the distance
    moved (float32 rounding)."""
    rng = np.random.default_rng(0)
    w0, b0 = (
        rng.normal(0, 0.02, (48, 80)).astype(np.float32),
        rng.normal(0, 0.02, 80).astype(np.float32),
    )
    grads = [
        (rng.normal(size=(48, 80)).astype(np.float32), rng.normal(size=80).astype(np.float32))
        for _ in range(3)
    ]
    tx = reference_muon(1e-2, momentum=0.95, b1=0.9, b2=0.95, weight_decay=0.1, ns_dtype="float32")
    params = {"w": jnp.asarray(w0.T), "b": jnp.asarray(b0)}
    state = tx.init(params)
    w, b = (
        torch.nn.Parameter(torch.from_numpy(w0.copy())),
        torch.nn.Parameter(torch.from_numpy(b0.copy())),
    )
    opt = ReferenceMuonWithAuxAdam([w, b], lr=1e-2, weight_decay=0.1, ns_dtype=torch.float32)
    for gw, gb in grads:
        updates, state = tx.update({"w": jnp.asarray(gw.T), "b": jnp.asarray(gb)}, state, params)
        params = optax.apply_updates(params, updates)
        w.grad, b.grad = torch.from_numpy(gw), torch.from_numpy(gb)
        opt.step()
    for ours, theirs, start in ((np.asarray(params["w"]).T, w, w0), (params["b"], b, b0)):
        theirs = theirs.detach().numpy()
        assert np.linalg.norm(ours - theirs) <= 1e-5 * np.linalg.norm(theirs - start)


@pytest.mark.parametrize("transpose", [False, True])
def test_newton_schulz_matches_reference_in_both_dtypes(transpose):
    """``newton_schulz`` against the PyTorch rewrite on a (192, 576) matrix and its transpose.
    float32: entries within 1e-5. bfloat16 (the reference's default): every product is rounded to
    8 bits and summed in another order on each side, so entries differ by about as much as either
    differs from float32 (3 %); what the rounding leaves in place is the polynomial, so compare
    the singular values (within 1.2 %, measured 0.4 %) and the RMS (within 1 %). Coefficients
    rounded to bfloat16, as optax's Muon rounds them, move both by 2-3 %."""
    g = np.random.default_rng(1).normal(size=(192, 576)).astype(np.float32)
    g = g.T if transpose else g
    ours32 = np.asarray(newton_schulz(jnp.asarray(g), jnp.float32))
    theirs32 = torch_newton_schulz(torch.from_numpy(g), torch.float32).numpy()
    np.testing.assert_allclose(ours32, theirs32, atol=1e-5 * np.abs(theirs32).max())
    ours = np.asarray(
        jax.jit(newton_schulz, static_argnums=1)(jnp.asarray(g), jnp.bfloat16).astype(jnp.float32)
    )
    theirs = torch_newton_schulz(torch.from_numpy(g), torch.bfloat16).float().numpy()
    sv_ours, sv_theirs = (
        np.linalg.svd(ours, compute_uv=False),
        np.linalg.svd(theirs, compute_uv=False),
    )
    assert np.linalg.norm(sv_ours - sv_theirs) <= 1.2e-2 * np.linalg.norm(sv_theirs)
    assert abs(np.sqrt(np.mean(ours**2)) / np.sqrt(np.mean(theirs**2)) - 1) <= 1e-2
