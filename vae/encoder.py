"""SSVAE encoder: video (B, 3, T, H, W) -> moments (B, 2*z, 1 + (T-1)/4, H/16, W/16) (mean, then log-variance)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vae.causal_conv import CausalConv3d
from vae.config import EncoderConfig
from vae.layers import AttentionBlock, ResnetBlock, make_norm
from vae.resample import ResidualDownsample


class EncoderLevel(nn.Module):
    """Resnet blocks at one resolution, then (except at the last level) a down-sampling."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if downsample is not None:
            self.downsample = downsample


def run_layers(layers, h: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Apply layers in order, each under activation checkpointing when asked (and gradients are on)."""
    for layer in layers:
        if use_checkpoint and torch.is_grad_enabled():
            h = checkpoint(layer, h, use_reentrant=False)
        else:
            h = layer(h)
    return h


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = CausalConv3d(config.in_channels, config.ch, 3)
        self.down = nn.ModuleList()
        block_in = config.ch
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(block_in, width, config.norm, config.dropout))
                block_in = width
            downsample = None
            if i < len(widths) - 1:
                downsample = ResidualDownsample(width, widths[i + 1], temporal=config.temporal_downsample[i])
                block_in = widths[i + 1]
            self.down.append(EncoderLevel(blocks, downsample))
        self.mid = nn.ModuleList()
        for i in range(config.num_mid_blocks):
            self.mid.append(ResnetBlock(block_in, block_in, config.norm, config.dropout))
            # Released quirk: the encoder compares the mid index with num_res_blocks (the decoder with
            # num_mid_blocks), so with num_res_blocks 3 every mid resnet is followed by attention.
            if config.mid_attention and i != config.num_res_blocks - 1:
                self.mid.append(AttentionBlock(block_in))
        self.out = nn.Sequential(
            make_norm(config.norm, block_in), nn.SiLU(), CausalConv3d(block_in, 2 * config.z_channels, 3)
        )
        if config.frozen:
            self.requires_grad_(False)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the final conv (the LCR adaptive weight is taken with respect to it)."""
        return self.out[2].conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.config.gradient_checkpointing and self.training
        h = self.conv_in(x)
        for level in self.down:
            h = run_layers(level.block, h, ckpt)
            if hasattr(level, "downsample"):
                h = run_layers([level.downsample], h, ckpt)
        h = run_layers(self.mid, h, ckpt)
        return self.out(h).contiguous()  # the convs run channels-last; callers get plain layout
