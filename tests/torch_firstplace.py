"""The first place's model in PyTorch, built on timm's ``Eva``, for parity tests: written in our
own words from the structure of thinkonward/challenges,
geoscience/speed-and-structure/Flamethrower/src/models/model_EVA_MHA_Handler.py. Random weights
only (no downloads). Geometry follows a ``fwi_jax.config.Config`` so reduced grids work.

Input (B, 5, T, R), the five shots scaled by 1e3; output (B, x, depth) as the first place lays it
out (their ``(N, 1, 300, 1259)`` without the singleton axis).
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from torch_reference import TIMM_NAMES


class SingleFusion(nn.Module):
    """Pre-norm self-attention over the channels of each token, residual, channel mean."""

    def __init__(self, dim, heads):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):  # (B, C, N, D) -> (B, N, D)
        b, c, n, d = x.shape
        s = x.permute(0, 2, 1, 3).reshape(b * n, c, d)
        h = self.norm(s)
        s = s + self.mha(h, h, h)[0]
        return s.mean(1).view(b, n, d)


class DualFusion(nn.Module):
    """Channel position embedding, pre-norm cross-channel attention with residual, attention from
    a learned query over the channels, LayerNorm (PyTorch's default eps)."""

    def __init__(self, dim, channels, heads, query_heads):
        super().__init__()
        self.channel_pos = nn.Parameter(torch.randn(1, channels, dim))
        self.cross_channel_mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.fusion_query = nn.Parameter(torch.randn(1, 1, dim))
        self.fusion_mha = nn.MultiheadAttention(dim, query_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x):
        b, c, n, d = x.shape
        s = x.permute(0, 2, 1, 3).reshape(b * n, c, d) + self.channel_pos
        h = self.norm1(s)
        s = s + self.cross_channel_mha(h, h, h)[0]
        q = self.fusion_query.expand(b * n, -1, -1)
        fused = self.fusion_mha(q, s, s)[0].squeeze(1).view(b, n, d)
        return self.norm2(fused)


class FirstPlaceModel(nn.Module):
    """``backbone`` (timm Eva, 1 input channel, dynamic image size), ``channel_fusion_mha``,
    ``head`` Linear(dim -> x): the first place's module and state_dict keys."""

    def __init__(self, cfg, pretrained_grid: bool = True):
        super().__init__()
        g, m = cfg.geometry, cfg.model
        kwargs = dict(pretrained=False, in_chans=1, dynamic_img_size=True)
        if not pretrained_grid:
            kwargs["img_size"] = tuple(g.resize)
        for key, name in (("dim", "embed_dim"), ("depth", "depth"), ("heads", "num_heads")):
            if getattr(m, key) is not None:
                kwargs[name] = getattr(m, key)
        self.cfg = cfg
        self.backbone = timm.create_model(TIMM_NAMES[m.size], **kwargs)
        dim = self.backbone.embed_dim
        self.head = nn.Linear(dim, g.out_shape[1])
        if m.fusion == "mha_single":
            self.channel_fusion_mha = SingleFusion(dim, m.fusion_heads)
        else:
            self.channel_fusion_mha = DualFusion(dim, 5, m.fusion_heads, m.fusion_query_heads)

    def forward(self, x):  # (B, 5, T, R) -> (B, x, depth)
        g, m = self.cfg.geometry, self.cfg.model
        b, c, t, r = x.shape
        x = x.reshape(b, c, t // g.fold, g.fold, r).permute(0, 1, 2, 4, 3)
        x = F.interpolate(
            x.reshape(b, c, t // g.fold, r * g.fold),
            size=tuple(g.resize),
            mode="bilinear",
            align_corners=False,
        )
        bb = self.backbone
        x = bb.patch_embed(x.reshape(b * c, 1, *g.resize))
        x, rope = bb._pos_embed(x)
        for blk in bb.blocks[: m.split]:
            x = blk(x, rope=rope)
        x = self.channel_fusion_mha(x.reshape(b, c, *x.shape[1:]))
        for blk in bb.blocks[m.split :]:
            x = blk(x, rope=rope)
        x = self.head(bb.norm(x)[:, 1:]).permute(0, 2, 1)  # (B, x, N)
        x = F.interpolate(x.unsqueeze(1), size=(g.out_shape[1], g.out_shape[0]), mode="area")
        return torch.sigmoid(x[:, 0].float()) * m.v_span + m.v_min

    def tta_forward(self, x):
        """Their flip TTA: receivers reversed (shot order kept), the output's x axis reversed."""
        return self.forward(torch.flip(x, dims=[-1])).flip(dims=[-2])


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial random values for every parameter (norm weights near 1), deterministic."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in f".{name}" and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("channel_pos", "fusion_query")):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model


class OnProjectInput(nn.Module):
    """A first-place module behind this project's interface, for benchmarks: x (B, 6, T, R) with
    amplitudes x1e4 and the zero channel -> velocity (B, depth, x)."""

    def __init__(self, model: FirstPlaceModel):
        super().__init__()
        self.model = model

    def forward(self, x):
        # the five shots whichever the orientation, as `preprocess.shot_channels` takes them:
        # of channels 2 and 3 one is the zero channel 151, so their sum is the shot
        five = torch.cat([x[:, :2], x[:, 2:3] + x[:, 3:4], x[:, 4:]], dim=1)
        return self.model(five * self.model.cfg.geometry.input_scale).transpose(1, 2)


def torch_model(cfg, seed: int = 0) -> nn.Module:
    """The PyTorch model of ``cfg`` behind this project's interface: the reference's
    (tests/torch_reference.py) or, for the first place's head, theirs; random weights."""
    if cfg.geometry.head == "token_linear":
        return OnProjectInput(randomize_(FirstPlaceModel(cfg), seed))
    from torch_reference import ReferenceModel
    from torch_reference import randomize_ as randomize_reference

    return randomize_reference(ReferenceModel(cfg), seed)


def flip_dims(cfg) -> tuple[int, ...]:
    """Input axes of (B, 6, T, R) that ``cfg``'s flip reverses."""
    return (1, 3) if cfg.geometry.flip_channels else (3,)
