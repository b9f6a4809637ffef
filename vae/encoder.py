"""SSVAE encoder: video (B, 3, T, H, W) -> moments (B, 2*z, 1 + (T-1)/4, H/16, W/16) (mean, then log-variance)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vae.causal_conv import CausalConv3d
from vae.config import EncoderConfig
from vae.layers import AttentionBlock, ResnetBlock, make_norm
from vae.resample import ResidualDownsample, ResidualUpsample, channel_resize, patchify, zero_


class EncoderLevel(nn.Module):
    """Resnet blocks at one resolution, then (except at the last level) a down-sampling."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if downsample is not None:
            self.downsample = downsample


def residual_zero_init(module: nn.Module, boundary: bool) -> None:
    """Init "residual_zero": every residual branch's last conv (resnet blocks, resampling convs, attention output)
    starts at zero, and with ``boundary`` shortcuts also conv_in and the output conv, so the untrained network is
    its parameter-free shortcuts alone."""
    for layer in module.modules():
        if isinstance(layer, ResnetBlock):
            zero_(layer.conv2)
        elif isinstance(layer, AttentionBlock):
            zero_(layer.proj)
        elif isinstance(layer, (ResidualDownsample, ResidualUpsample)):
            zero_(layer.conv)
    if boundary:
        zero_(module.conv_in)
        zero_(module.out[2])


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
        self.conv_in = CausalConv3d(config.patched_channels, config.ch, 3)
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
        if config.init == "residual_zero":
            residual_zero_init(self, config.boundary_shortcuts)
            with torch.no_grad():
                self.out[2].conv.bias[config.z_channels:] = config.logvar_init
        if config.frozen:
            self.requires_grad_(False)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the final conv (the LCR adaptive weight is taken with respect to it)."""
        return self.out[2].conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.config.gradient_checkpointing and self.training
        shortcuts = self.config.boundary_shortcuts
        x = patchify(x, self.config.patch_size)
        h = self.conv_in(x)
        if shortcuts:
            h = h + channel_resize(x, h.shape[1])
        for level in self.down:
            h = run_layers(level.block, h, ckpt)
            if hasattr(level, "downsample"):
                h = run_layers([level.downsample], h, ckpt)
        h = run_layers(self.mid, h, ckpt)
        moments = self.out(h)
        if shortcuts:  # the posterior mean only; the log-variance has no natural shortcut
            z = self.config.z_channels
            moments = torch.cat([moments[:, :z] + channel_resize(h, z), moments[:, z:]], dim=1)
        return moments.contiguous()  # the convs run channels-last; callers get plain layout
