"""Normalisation, resnet and attention blocks of the SSVAE (names follow the released checkpoint)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vae.causal_conv import CausalConv3d


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a learned per-channel `gamma`; no bias.

    `spatial_dims` is 3 for (B, C, T, H, W) inputs (gamma (C, 1, 1, 1)) and 2 for frames (gamma (C, 1, 1)).
    """

    def __init__(self, channels: int, spatial_dims: int = 3) -> None:
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * (self.gamma * self.scale)


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(channels)
    if kind == "groupnorm":
        return nn.GroupNorm(32, channels, eps=1e-6)
    raise ValueError(f"norm must be 'rmsnorm' or 'groupnorm', got {kind!r}")


class ResnetBlock(nn.Module):
    """norm -> SiLU -> causal conv -> norm -> SiLU -> dropout -> causal conv, plus the (1x1x1-projected) input."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "rmsnorm", dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = make_norm(norm, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.nin_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately (so it stays causal)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = RMSNorm(channels, spatial_dims=2)
        self.to_qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        # The block starts as the identity.
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, 3, c, h * w).transpose(2, 3)  # (bt, 3, hw, c)
        q, k, v = qkv.unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (bt, hw, c)
        out = self.proj(out.transpose(1, 2).reshape(b * t, c, h, w))
        return x + out.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)
