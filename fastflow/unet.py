"""The U-Net v_θ(x, t, y): sinusoidal time embedding, label embedding, residual blocks, skip connections.

With ``ModelConfig.mean_flow`` it is MeanFlow's u_θ(x, t, s, y), the average velocity from t to a later time s:
a second time input, the gap s − t, goes through the same sinusoidal features and its own MLP, whose last layer
starts at zero, and is added to the embedding. So a mean-flow U-Net that takes a flow-matching U-Net's weights
(the gap MLP left at its initialisation) is exactly that U-Net's v(x, t) for every s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

__all__ = ["UNet", "time_embedding", "group_norm_plain", "count_parameters"]


def time_embedding(t: torch.Tensor, dim: int, max_freq: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of t ∈ [0, 1], shape (B,) -> (B, dim).

    Frequencies are geometric from 1 to ``max_freq`` radians per unit of t. The usual transformer recipe
    (periods up to 10000 applied to t itself) barely moves over [0, 1]: its features change by < 1e-3 between
    t = 0 and t = 1 in most channels. Here the fastest channel turns ~160 times over the interval (resolving
    Δt ≈ 1e-3) and the slowest less than a sixth of a turn (a monotone "coarse clock").
    """
    half = dim // 2
    # fp32, or fp64 for an fp64 t (tests compare derivatives in t against finite differences in fp64)
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), half, device=t.device, dtype=dtype))
    args = t.to(dtype)[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm_plain(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm(x)`` through elementary ops (mean, rsqrt, ...), for x of shape (B, C, ...).

    For MeanFlow's forward-mode JVP under torch.compile: in torch 2.14 Dynamo cannot trace the forward-mode
    formula of ``native_group_norm`` (fake-tensor propagation hits an internal assert on ``_fw_primal``, with
    ``torch.func.jvp`` and with ``torch.autograd.forward_ad`` alike), while these ops trace and differentiate.
    Eager, it agrees with ``F.group_norm`` to fp32 rounding; the gradient-taking forward keeps the fused op."""
    b, c = x.shape[:2]
    h = x.reshape(b, norm.num_groups, -1)  # [B, G, C/G·H·W]
    mean = h.mean(dim=-1, keepdim=True)
    var = (h - mean).pow(2).mean(dim=-1, keepdim=True)  # biased, as GroupNorm's
    h = ((h - mean) * torch.rsqrt(var + norm.eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    return h * norm.weight.view(shape) + norm.bias.view(shape)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    g = math.gcd(channels, groups)
    return nn.GroupNorm(g, channels)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, conditioning added as a per-channel scale and shift, → GroupNorm → SiLU → conv,
    plus the (1×1-projected) input."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, plain_norm: bool = False) -> torch.Tensor:
        norm = group_norm_plain if plain_norm else lambda h, m: m(h)
        h = self.conv1(F.silu(norm(x, self.norm1)))  # [B, C, H, W]
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # [B, C, 1, 1] each
        h = norm(h, self.norm2) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class UNet(nn.Module):
    """v_θ(x, t, y) for 28×28 images: three resolutions (28, 14, 7), widths ``cfg.channels``; with
    ``cfg.patch`` = 2 the network first folds each 2×2 block of pixels into 4 channels (space-to-depth) and runs
    at 14 and 7 pixels, unfolding its output at the end; with ``cfg.mean_flow`` the average velocity
    u_θ(x, t, s, y) over [t, s].

    Args of :meth:`forward`:
        x: (B, 1, 28, 28) state on the path.
        t: (B,) time in [0, 1].
        y: (B,) int64 labels in 0..num_classes, where ``num_classes`` means "no label".
        s: (B,) the later time s ≥ t of a mean-flow U-Net (None: s = t, the instantaneous field). Only a
            mean-flow U-Net takes it: passing it to another is a ValueError, not a silently ignored input.
        plain_norm: GroupNorm through elementary ops (:func:`group_norm_plain`), for a forward-mode JVP that
            torch.compile must trace.

    Returns the predicted field, shape (B, 1, 28, 28).
    """

    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        self.cfg = cfg
        chans, e, g = cfg.channels, cfg.emb_dim, cfg.groups
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.label_emb = nn.Embedding(cfg.num_classes + 1, e)  # one-hot × matrix, +1 row for "no label"
        pixels = cfg.in_channels * cfg.patch**2  # values per pixel the U-Net sees (space-to-depth stem)
        self.conv_in = nn.Conv2d(pixels, chans[0], 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, c = [chans[0]], chans[0]
        for i, ch in enumerate(chans):
            for _ in range(cfg.blocks_per_level):
                self.down.append(ResBlock(c, ch, e, g))
                c = ch
                skips.append(c)
            if i < len(chans) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = ResBlock(c, c, e, g)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, ch in reversed(list(enumerate(chans))):
            for _ in range(cfg.blocks_per_level + 1):
                self.up.append(ResBlock(c + skips.pop(), ch, e, g))
                c = ch
            if i > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.norm_out = _norm(c, g)
        self.conv_out = nn.Conv2d(c, pixels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        if cfg.mean_flow:
            # Built last, so every other weight is the one a flow-matching U-Net gets from the same seed. The
            # zero last layer: at initialisation the gap changes nothing (u = v for every s).
            self.gap_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
            nn.init.zeros_(self.gap_mlp[2].weight)
            nn.init.zeros_(self.gap_mlp[2].bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        s: torch.Tensor | None = None,
        *,
        plain_norm: bool = False,
    ) -> torch.Tensor:
        cfg = self.cfg
        emb = self.time_mlp(time_embedding(t, cfg.emb_dim).to(x.dtype)) + self.label_emb(y)  # [B, E]
        if cfg.mean_flow:
            gap = torch.zeros_like(t) if s is None else s - t  # [B]; s = None: s = t
            emb = emb + self.gap_mlp(time_embedding(gap, cfg.emb_dim).to(x.dtype))
        elif s is not None:
            raise ValueError("this U-Net has no second time input s (ModelConfig.mean_flow is False)")
        emb = F.silu(emb)
        if cfg.patch > 1:
            x = F.pixel_unshuffle(x, cfg.patch)  # [B, patch², 28/patch, 28/patch]
        h = self.conv_in(x)
        hs = [h]
        blocks = iter(self.down)
        for i in range(len(cfg.channels)):
            for _ in range(cfg.blocks_per_level):
                h = next(blocks)(h, emb, plain_norm)
                hs.append(h)
            if i < len(cfg.channels) - 1:
                # 28 -> 14 -> 7 (stride-2 conv, padding 1: ceil division)
                h = self.downsample[i](h)
                hs.append(h)
        h = self.mid(h, emb, plain_norm)
        blocks = iter(self.up)
        for j, i in enumerate(reversed(range(len(cfg.channels)))):
            for _ in range(cfg.blocks_per_level + 1):
                h = next(blocks)(torch.cat([h, hs.pop()], dim=1), emb, plain_norm)
            if i > 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")  # nearest, as in the original
                h = self.upsample[j](h)
        h = group_norm_plain(h, self.norm_out) if plain_norm else self.norm_out(h)
        out = self.conv_out(F.silu(h))
        return F.pixel_shuffle(out, cfg.patch) if cfg.patch > 1 else out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
