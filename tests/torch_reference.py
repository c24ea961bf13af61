"""The reference solution's model in PyTorch, built on timm's ``Eva`` (reference §3), and its
training recipe (optimizer, learning-rate multiplier, loss), for parity tests and benchmarks.
Written from docs/reference.md and the reference's code in our own words; random weights only
(no downloads).

Geometry follows a ``fwi_jax.config.Geometry`` so reduced grids work; the head's pixel shuffle is
PyTorch's (square ``head_patch`` only, as in the reference).
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

TIMM_NAMES = {
    "tiny": "eva02_tiny_patch14_224",
    "small": "eva02_small_patch14_224",
    "base": "eva02_base_patch14_448",
    "large": "eva02_large_patch14_448",
}


class ReferenceModel(nn.Module):
    """``backbone`` (timm Eva, 1 input channel, dynamic image size) + ``head`` (Linear)."""

    def __init__(self, cfg, pretrained_grid: bool = True):
        super().__init__()
        g, m = cfg.geometry, cfg.model
        assert g.head_patch[0] == g.head_patch[1], "the reference uses a square pixel shuffle"
        kwargs = dict(pretrained=False, in_chans=1, dynamic_img_size=True)
        if not pretrained_grid:  # pos-embed created at the config's grid (no resampling)
            kwargs["img_size"] = (g.resize[0], g.resize[1])
        for key in ("dim", "depth", "heads"):
            if getattr(m, key) is not None:
                kwargs[{"dim": "embed_dim", "depth": "depth", "heads": "num_heads"}[key]] = getattr(
                    m, key
                )
        self.cfg = cfg
        self.backbone = timm.create_model(TIMM_NAMES[m.size], **kwargs)
        dim = self.backbone.embed_dim
        self.head = nn.Linear(dim, g.head_patch[0] * g.head_patch[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, R) -> (B, depth, x)
        g, m = self.cfg.geometry, self.cfg.model
        b, c, t, r = x.shape
        x = (
            x.reshape(b, c, t // g.fold, g.fold, r)
            .permute(0, 1, 2, 4, 3)
            .reshape(b, c, t // g.fold, r * g.fold)
        )
        x = F.interpolate(x, size=tuple(g.resize), mode="bilinear", align_corners=False)
        x = x.reshape(b * c, 1, *g.resize)
        bb = self.backbone
        x = bb.patch_embed(x)
        x, rope = bb._pos_embed(x)
        x = bb.norm_pre(x)
        for blk in bb.blocks[: m.split]:
            x = blk(x, rope=rope)
        x = x.reshape(b, c, *x.shape[1:]).mean(1)
        for blk in bb.blocks[m.split :]:
            x = blk(x, rope=rope)
        x = bb.norm(x)[:, 1:]
        gh, gw = g.grid
        x = self.head(x).transpose(1, 2).reshape(b, -1, gh, gw)
        x = F.pixel_shuffle(x, g.head_patch[0])[:, 0]
        (r0, c0), (oh, ow) = g.crop_offset, g.out_shape
        x = x[:, r0 : r0 + oh, c0 : c0 + ow]
        return torch.sigmoid(x.float()) * m.v_span + m.v_min


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter non-trivial random values (biases and norms too, so parity tests
    exercise every path), deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "mlp.norm.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model


# ---------------------------------------------------------------------------------------------
# The reference's training recipe: optimizer, learning-rate multiplier, loss


def newton_schulz(
    g: torch.Tensor, dtype: torch.dtype = torch.bfloat16, steps: int = 5
) -> torch.Tensor:
    """Approximate orthogonalisation U V^T of g = U S V^T: g / (||g||_F + 1e-7), then ``steps``
    quintic iterations X <- 3.4445 X + (-4.7750 A + 2.0315 A^2) X with A = X X^T, on the wide
    orientation of g (transposed when it has more rows than columns), in ``dtype``."""
    x = g.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(steps):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x.T if tall else x


class ReferenceMuonWithAuxAdam(torch.optim.Optimizer):
    """The reference solution's optimizer (``MuonWithAuxAdam`` in thinkonward/challenges,
    geoscience/speed-and-structure/shaodong/src/optim/muon.py), its rule rewritten for the tests.

    One learning rate ``lr`` and decoupled weight decay ``p <- p (1 - lr wd)`` for every
    parameter. 2-D parameters (linear weights, the head's included) take Muon:
    ``buf <- lerp(buf, g, 1 - momentum)``, Nesterov input ``lerp(g, buf, momentum)``, Newton-Schulz
    in ``ns_dtype``, times 0.2 sqrt(max(rows, cols)), ``p <- p - lr u``. All others (biases,
    norms, cls token and position embedding (3-D), patch-embedding convolution (4-D)) take plain
    Adam with bias correction."""

    def __init__(
        self,
        params,
        lr=2e-4,
        weight_decay=0.01,
        momentum=0.95,
        betas=(0.9, 0.95),
        eps=1e-8,
        ns_dtype=torch.bfloat16,
    ):
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "betas": betas,
            "eps": eps,
            "ns_dtype": ns_dtype,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])
                (self._muon if p.ndim == 2 else self._adam)(group, p, self.state[p])

    @staticmethod
    def _muon(group, p, state):
        g, m = p.grad, group["momentum"]
        buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
        buf.lerp_(g, 1 - m)
        u = newton_schulz(torch.lerp(g, buf, m), group["ns_dtype"])
        u = u * (0.2 * max(p.shape) ** 0.5)
        p.add_(u.to(p.dtype), alpha=-group["lr"])

    @staticmethod
    def _adam(group, p, state):
        g, (b1, b2) = p.grad, group["betas"]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        t = state["step"]
        state["exp_avg"].lerp_(g, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (state["exp_avg_sq"].sqrt() / (1 - b2**t) ** 0.5).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - b1**t))


def reference_lr_multiplier(step: int, total_steps: int, final: float = 1e-3) -> float:
    """The reference's schedule (fvcore CompositeParamScheduler, both halves rescaled, read at
    step / total_steps as detectron2's LRMultiplier does): 1 for the first half, then a cosine
    from 1 to ``final``."""
    where = step / total_steps
    if where + 1e-6 <= 0.5:
        return 1.0
    t = (where - 0.5) / 0.5
    return final + 0.5 * (1 - final) * (1 + math.cos(math.pi * t))


def reference_hard_loss(pred: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The reference's training loss: relative L1, depth-weighted 1 -> 0.25, pixels reweighted by
    exp(error) (detached) normalised to mean 1 per sample."""
    e = (pred - v).abs() / v
    w = torch.linspace(1.0, 0.25, v.shape[1])[None, :, None]
    h = torch.exp(e.detach())
    h = h * (h.shape[1] * h.shape[2]) / h.sum(dim=(1, 2), keepdim=True)
    return (e * w * h).mean()
