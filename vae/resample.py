"""Down- and up-sampling with parameter-free residual shortcuts (DC-AE style), spatial or spatio-temporal.

Down: main = strided conv; shortcut = space(-time)-to-channel rearrangement, then the mean over groups of
consecutive channels down to the output width. Up: main = nearest 2x repeat then a causal conv; shortcut =
channel repetition, then channel-to-space(-time). In time, frame 0 stands alone: up-sampling turns T frames into
2T - 1, and down-sampling's shortcut prepends one zero frame so that 1 + 2k frames become 1 + k.
The channel orders of the rearrangements are those of the released checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vae.causal_conv import CausalConv3d, StreamStart


def space_time_to_channel_mean(x: torch.Tensor, out_channels: int, temporal: bool) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, out, T/ft, H/2, W/2): unshuffle into C*ft*4 channels (order c, ft, fh, fw), then
    average each run of consecutive channels down to `out_channels`."""
    b, c, t, h, w = x.shape
    ft = 2 if temporal else 1
    x = x.view(b, c, t // ft, ft, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 7, 2, 4, 6)
    group = c * ft * 4 // out_channels
    return x.reshape(b, out_channels, group, t // ft, h // 2, w // 2).mean(dim=2)


def channel_to_space_time(x: torch.Tensor, out_channels: int, temporal: bool) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, out, T*ft, 2H, 2W): repeat each channel, then shuffle channels (order c, ft, fh, fw)
    into time and space."""
    b, c, t, h, w = x.shape
    ft = 2 if temporal else 1
    x = x.repeat_interleave(out_channels * ft * 4 // c, dim=1)
    x = x.view(b, out_channels, ft, 2, 2, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, out_channels, t * ft, h * 2, w * 2)


def channel_resize(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """(B, C, ...) -> (B, out, ...) without parameters: each channel repeated (out > C) or consecutive groups of
    channels averaged (out < C); one width must divide the other. The boundary shortcuts of ``boundary_shortcuts``."""
    c = x.shape[1]
    if out_channels == c:
        return x
    if out_channels > c:
        return x.repeat_interleave(out_channels // c, dim=1)
    return x.reshape(x.shape[0], out_channels, c // out_channels, *x.shape[2:]).mean(dim=2)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, 4C, T, H/2, W/2) for p = 2 (identity for p = 1): each frame's 2x2 pixel patches as
    channels, as Wan 2.2's VAE does at its input. The down-sampling shortcut's space-to-channel rearrangement (order
    c, fh, fw) without its averaging; frame by frame, so causality is untouched."""
    return x if p == 1 else space_time_to_channel_mean(x, 4 * x.shape[1], temporal=False)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: the up-sampling shortcut's channel-to-space rearrangement, without repeats."""
    return x if p == 1 else channel_to_space_time(x, x.shape[1] // 4, temporal=False)


def zero_(layer: nn.Module) -> None:
    """Zero a conv's weight and bias: a residual branch that starts as nothing (init "residual_zero")."""
    conv = getattr(layer, "conv", layer)
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ResidualDownsample(StreamStart):
    """Halve H and W (and T when `temporal`), changing the width from in_channels to out_channels."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool) -> None:
        super().__init__()
        if (in_channels * (8 if temporal else 4)) % out_channels:
            raise ValueError(f"downsample: {in_channels} channels cannot be averaged down to {out_channels}")
        self.temporal = temporal
        self.out_channels = out_channels
        if temporal:
            # Causal in time (first frame repeated twice in front), padded one at right and bottom.
            self.conv = CausalConv3d(in_channels, out_channels, 3, stride=2, spatial_padding=(0, 1, 0, 1))
        else:
            # A 2D conv applied to each frame; run as a (1, 3, 3) conv3d so no (B*T) reshuffle is needed.
            self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.temporal:
            if self.is_video_start():
                x_sc = F.pad(x, (0, 0, 0, 0, 1, 0))  # one zero frame in front: frame 0 pairs with it
            else:
                x_sc = x
            shortcut = space_time_to_channel_mean(x_sc, self.out_channels, temporal=True)
            main = self.conv(x)
        else:
            shortcut = space_time_to_channel_mean(x, self.out_channels, temporal=False)
            main = F.conv3d(F.pad(x, (0, 1, 0, 1)), self.conv.weight.unsqueeze(2), self.conv.bias, stride=(1, 2, 2))
        return main + shortcut


class ResidualUpsample(StreamStart):
    """Double H and W (and T -> 2T - 1 when `temporal`), changing the width from in_channels to out_channels."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool) -> None:
        super().__init__()
        if (out_channels * (8 if temporal else 4)) % in_channels:
            raise ValueError(f"upsample: {in_channels} channels cannot be repeated up to {out_channels}")
        self.temporal = temporal
        self.out_channels = out_channels
        self.conv = CausalConv3d(in_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = channel_to_space_time(x, self.out_channels, self.temporal)
        x = F.interpolate(x, scale_factor=(2 if self.temporal else 1, 2, 2), mode="nearest")
        if self.temporal and self.is_video_start():
            # Frame 0 is not doubled in time: drop the first of its two copies (in both paths).
            x, shortcut = x[:, :, 1:], shortcut[:, :, 1:]
        return self.conv(x) + shortcut
