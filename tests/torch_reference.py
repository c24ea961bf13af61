"""The reference solution's model in PyTorch, built on timm's ``Eva`` (SPEC §3), for parity tests
and benchmarks. Written from the SPEC in our own words; random weights only (no downloads).

Geometry follows a ``fwi_jax.config.Geometry`` so reduced grids work; the head's pixel shuffle is
PyTorch's (square ``head_patch`` only, as in the reference).
"""

from __future__ import annotations

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

TIMM_NAMES = {"tiny": "eva02_tiny_patch14_224", "small": "eva02_small_patch14_224",
              "base": "eva02_base_patch14_448", "large": "eva02_large_patch14_448"}


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
                kwargs[{"dim": "embed_dim", "depth": "depth", "heads": "num_heads"}[key]] = getattr(m, key)
        self.cfg = cfg
        self.backbone = timm.create_model(TIMM_NAMES[m.size], **kwargs)
        dim = self.backbone.embed_dim
        self.head = nn.Linear(dim, g.head_patch[0] * g.head_patch[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, R) -> (B, depth, x)
        g, m = self.cfg.geometry, self.cfg.model
        b, c, t, r = x.shape
        x = x.reshape(b, c, t // g.fold, g.fold, r).permute(0, 1, 2, 4, 3).reshape(b, c, t // g.fold, r * g.fold)
        x = F.interpolate(x, size=tuple(g.resize), mode="bilinear", align_corners=False)
        x = x.reshape(b * c, 1, *g.resize)
        bb = self.backbone
        x = bb.patch_embed(x)
        x, rope = bb._pos_embed(x)
        x = bb.norm_pre(x)
        for blk in bb.blocks[: m.split]:
            x = blk(x, rope=rope)
        x = x.reshape(b, c, *x.shape[1:]).mean(1)
        for blk in bb.blocks[m.split:]:
            x = blk(x, rope=rope)
        x = bb.norm(x)[:, 1:]
        gh, gw = g.grid
        x = self.head(x).transpose(1, 2).reshape(b, -1, gh, gw)
        x = F.pixel_shuffle(x, g.head_patch[0])[:, 0]
        (r0, c0), (oh, ow) = g.crop_offset, g.out_shape
        x = x[:, r0:r0 + oh, c0:c0 + ow]
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
