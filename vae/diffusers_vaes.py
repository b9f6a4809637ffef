"""The paper's comparison VAEs as trainable models: diffusers' ``AutoencoderKLWan`` (Wan 2.2's design) and
``AutoencoderKLCogVideoX``, built at any width from a config, trained by ``vae.train`` with SSVAE's losses.

``vae.train`` needs of a model: ``posterior(x)`` (our ``DiagonalGaussian``, whose KL sums every latent element: diffusers'
own sums only dims 1-3 of a 5-D latent), ``decode_latent(z)``, the last conv weights of the encoder and the decoder
(for the adaptive LCR and GAN weights), and ``mask_token``: LMR's learned latent token, kept beside the diffusers
model because neither design has one (it is training-only and not exported). ``save_pretrained`` writes the diffusers
model alone, so ``AutoencoderKLWan.from_pretrained(folder)`` / ``AutoencoderKLCogVideoX.from_pretrained(folder)``
load it as their own class, and ``vae.first_stage`` takes the folder as a ``wan`` / ``cogvideox`` first stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from infra.config import check, join_key
from vae.posterior import DiagonalGaussian


@dataclass
class WanVAEConfig:
    """``AutoencoderKLWan``; the defaults are Wan 2.2's VAE: residual blocks, 2x2 pixel patches, 48 channels, 4x16x16
    (spatial compression = patch_size x 2^(len(dim_mult) - 1), temporal = 2^(number of true temporal_downsample))."""

    base_dim: int = 160
    decoder_base_dim: int = 256
    z_dim: int = 48
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    temporal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])
    is_residual: bool = True
    patch_size: int = 2
    dropout: float = 0.0

    @property
    def z_channels(self) -> int:
        return self.z_dim

    @property
    def spatial_compression(self) -> int:
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    def validate(self, prefix: str = "wan") -> None:
        def key(name: str) -> str:
            return join_key(prefix, name)

        for name in ("base_dim", "decoder_base_dim", "z_dim", "num_res_blocks", "patch_size"):
            check(getattr(self, name) >= 1, key(name), f"must be >= 1, got {getattr(self, name)}")
        check(len(self.dim_mult) >= 2 and all(m >= 1 for m in self.dim_mult), key("dim_mult"),
              f"must be two or more positive ints, got {list(self.dim_mult)}")
        check(len(self.temporal_downsample) == len(self.dim_mult) - 1, key("temporal_downsample"),
              f"needs one entry per down-sampling (len(dim_mult) - 1 = {len(self.dim_mult) - 1}), "
              f"got {len(self.temporal_downsample)}")
        check(0.0 <= self.dropout < 1.0, key("dropout"), f"must be in [0, 1), got {self.dropout}")

    def build(self) -> nn.Module:
        from diffusers import AutoencoderKLWan

        channels = 3 * self.patch_size ** 2
        return AutoencoderKLWan(
            base_dim=self.base_dim, decoder_base_dim=self.decoder_base_dim, z_dim=self.z_dim,
            dim_mult=list(self.dim_mult), num_res_blocks=self.num_res_blocks,
            temperal_downsample=[bool(t) for t in self.temporal_downsample], dropout=self.dropout,
            is_residual=self.is_residual, in_channels=channels, out_channels=channels,
            patch_size=self.patch_size if self.patch_size > 1 else None,
            scale_factor_spatial=self.spatial_compression, scale_factor_temporal=self.temporal_compression,
            latents_mean=[0.0] * self.z_dim, latents_std=[1.0] * self.z_dim)


@dataclass
class CogVideoXVAEConfig:
    """``AutoencoderKLCogVideoX``; the defaults are CogVideoX's VAE: 16 channels, 4x8x8 (spatial compression =
    2^(len(block_out_channels) - 1), temporal = temporal_compression_ratio)."""

    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 256, 512])
    latent_channels: int = 16
    layers_per_block: int = 3
    norm_num_groups: int = 32
    temporal_compression_ratio: int = 4

    @property
    def z_channels(self) -> int:
        return self.latent_channels

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_compression(self) -> int:
        return int(self.temporal_compression_ratio)

    def validate(self, prefix: str = "cogvideox") -> None:
        def key(name: str) -> str:
            return join_key(prefix, name)

        check(len(self.block_out_channels) >= 2 and all(w >= 1 for w in self.block_out_channels),
              key("block_out_channels"), f"must be two or more positive widths, got {list(self.block_out_channels)}")
        check(self.norm_num_groups >= 1, key("norm_num_groups"), f"must be >= 1, got {self.norm_num_groups}")
        bad = [w for w in self.block_out_channels if w % self.norm_num_groups]
        check(not bad, key("block_out_channels"),
              f"widths {bad} are not divisible by norm_num_groups ({self.norm_num_groups}): GroupNorm needs that")
        check(self.latent_channels >= 1 and self.layers_per_block >= 1, key("latent_channels"),
              "latent_channels and layers_per_block must be >= 1")
        ratio, downs = self.temporal_compression_ratio, len(self.block_out_channels) - 1
        check(ratio >= 1 and ratio & (ratio - 1) == 0 and ratio <= 2 ** downs, key("temporal_compression_ratio"),
              f"must be a power of 2 up to 2^{downs} (one halving per down-sampling at most), got {ratio}")

    def build(self) -> nn.Module:
        from diffusers import AutoencoderKLCogVideoX

        levels = len(self.block_out_channels)
        return AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * levels, up_block_types=("CogVideoXUpBlock3D",) * levels,
            block_out_channels=tuple(self.block_out_channels), latent_channels=self.latent_channels,
            layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
            temporal_compression_ratio=self.temporal_compression_ratio, scaling_factor=1.0)


def check_buildable(config: WanVAEConfig | CogVideoXVAEConfig, key: str) -> None:
    """Build the design on the meta device (no memory, no weights) so that a combination of widths diffusers refuses
    stops the run at start-up with the config key named (e.g. Wan's residual shortcuts need each level's width times
    its down-sampling factor to be divisible by the next width)."""
    from infra.config import ConfigError

    try:
        with torch.device("meta"):
            config.build()
    except ValueError as e:
        raise ConfigError(f"{key}: diffusers refuses this design: {e}") from None


class DiffusersVAE(nn.Module):
    """A diffusers video VAE as ``vae.train`` trains it (see the module docstring). ``kind``: "wan" | "cogvideox"."""

    def __init__(self, kind: str, model: nn.Module):
        super().__init__()
        if kind not in ("wan", "cogvideox"):
            raise ValueError(f"model.kind: a diffusers VAE is 'wan' or 'cogvideox', got {kind!r}")
        self.kind, self.model = kind, model
        cfg = model.config
        if kind == "wan":
            self.z_channels = cfg.z_dim
            self.spatial_compression = int(cfg.scale_factor_spatial)
            self.temporal_compression = int(cfg.scale_factor_temporal)
        else:
            self.z_channels = cfg.latent_channels
            self.spatial_compression = 2 ** (len(cfg.block_out_channels) - 1)
            self.temporal_compression = int(cfg.temporal_compression_ratio)
        self.mask_token = nn.Parameter(torch.randn(1, self.z_channels, 1, 1, 1))

    @classmethod
    def from_config(cls, kind: str, config: WanVAEConfig | CogVideoXVAEConfig) -> "DiffusersVAE":
        return cls(kind, config.build())

    @classmethod
    def from_pretrained(cls, kind: str, folder: str | Path) -> "DiffusersVAE":
        """Start from a diffusers folder (a released VAE, or one exported by an earlier run)."""
        from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan

        model_class = AutoencoderKLWan if kind == "wan" else AutoencoderKLCogVideoX
        return cls(kind, model_class.from_pretrained(str(folder), local_files_only=True))

    def posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        dist = self.model.encode(x).latent_dist
        return DiagonalGaussian(torch.cat([dist.mean, dist.logvar], dim=1))

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent -> video (diffusers' Wan decoder clamps its output to [-1, 1])."""
        return self.model.decode(z).sample

    @property
    def encoder_last_layer(self) -> nn.Parameter:
        """The conv producing the posterior's moments: Wan's quant_conv, CogVideoX's encoder conv_out (its
        quant_conv is off by default)."""
        if self.kind == "wan":
            return self.model.quant_conv.weight
        quant = getattr(self.model, "quant_conv", None)
        return quant.weight if quant is not None else self.model.encoder.conv_out.conv.weight

    @property
    def decoder_last_layer(self) -> nn.Parameter:
        conv = self.model.decoder.conv_out
        return conv.weight if self.kind == "wan" else conv.conv.weight

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def save_pretrained(self, folder: str | Path) -> None:
        self.model.save_pretrained(str(folder))
