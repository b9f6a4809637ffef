"""SSVAE decoder: latent (B, z, F, h, w) -> video (B, 3, 1 + 4(F-1), 16h, 16w)."""

from __future__ import annotations

import torch
from torch import nn

from vae.causal_conv import CausalConv3d
from vae.config import DecoderConfig
from vae.encoder import residual_zero_init, run_layers
from vae.layers import AttentionBlock, ResnetBlock, make_norm
from vae.resample import ResidualUpsample, channel_resize, unpatchify


class DecoderLevel(nn.Module):
    """Resnet blocks at one resolution, then (except at the last level) an up-sampling."""

    def __init__(self, blocks: list[nn.Module], upsample: nn.Module | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if upsample is not None:
            self.upsample = upsample


class Decoder(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        # Decoding order: widest level first (ch_mult reversed); `up.0` is the first level applied.
        widths = [config.ch * m for m in reversed(config.ch_mult)]
        block_in = widths[0]
        self.conv_in = CausalConv3d(config.z_channels, block_in, 3)
        self.mid = nn.ModuleList()
        for i in range(config.num_mid_blocks):
            self.mid.append(ResnetBlock(block_in, block_in, config.norm, config.dropout))
            if config.mid_attention and i != config.num_mid_blocks - 1:
                self.mid.append(AttentionBlock(block_in))
        self.up = nn.ModuleList()
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, width, config.norm, config.dropout))
                block_in = width
            upsample = None
            if i < len(widths) - 1:
                upsample = ResidualUpsample(width, widths[i + 1], temporal=config.temporal_upsample[i])
                block_in = widths[i + 1]
            self.up.append(DecoderLevel(blocks, upsample))
        self.out = nn.Sequential(
            make_norm(config.norm, block_in), nn.SiLU(), CausalConv3d(block_in, config.patched_channels, 3)
        )
        if config.init == "residual_zero":
            residual_zero_init(self, config.boundary_shortcuts)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the final conv (the GAN adaptive weight is taken with respect to it)."""
        return self.out[2].conv.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        ckpt = self.config.gradient_checkpointing and self.training
        shortcuts = self.config.boundary_shortcuts
        h = self.conv_in(z)
        if shortcuts:
            h = h + channel_resize(z, h.shape[1])
        h = run_layers(self.mid, h, ckpt)
        for level in self.up:
            h = run_layers(level.block, h, ckpt)
            if hasattr(level, "upsample"):
                h = run_layers([level.upsample], h, ckpt)
        out = self.out(h)
        if shortcuts:
            out = out + channel_resize(h, out.shape[1])
        return unpatchify(out, self.config.patch_size).contiguous()  # the convs run channels-last; callers get plain layout
