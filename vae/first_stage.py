"""One first-stage (VAE) interface for diffusion training, with SSVAE, Wan and CogVideoX implementations.

A diffusion model only needs: video (B, 3, T, H, W) in [-1, 1] -> latents normalised to roughly unit scale,
latents -> video in [-1, 1], and the latent geometry. Each wrapper is frozen (no gradients, eval mode) and returns
float32 tensors whatever dtype the VAE runs in. Weights come from local folders only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from infra.config import check, join_key
from infra.dtypes import torch_dtype
from vae.inference import InferenceConfig, decode_latents, encode_posterior_moments, encode_video
from vae.model import SSVAE

FIRST_STAGE_KINDS = ("ssvae", "wan", "cogvideox")


@dataclass
class FirstStageConfig:
    kind: str = "ssvae"
    # Local folder: SSVAE.save_pretrained output, or a diffusers AutoencoderKLWan / AutoencoderKLCogVideoX folder.
    path: str = ""
    dtype: str = "float32"
    # Encode to a posterior sample instead of its mean.
    sample: bool = False
    # SSVAE only: latent frames per temporal chunk (None = whole video). Wan and CogVideoX chunk time themselves.
    chunk_latent_frames: Optional[int] = None
    # Spatial tiling (pixels) for all kinds; None = whole frames.
    tile_size: Optional[int] = None
    tile_overlap: int = 64
    # An invertible transform of the normalised latents (vae.latent_transform, the study's spectral controls):
    # applied after encode, undone before decode. Empty: none.
    latent_transform: str = ""

    def validate(self, prefix: str = "first_stage") -> None:
        """Values only: whether the folders exist is checked when the stage is loaded (``load_first_stage``), so a
        study can validate a run whose first stage is still to be trained."""
        check(self.kind in FIRST_STAGE_KINDS, join_key(prefix, "kind"),
              f"must be one of {FIRST_STAGE_KINDS}, got {self.kind!r}")
        check(bool(self.path), join_key(prefix, "path"), "must name a local folder")
        torch_dtype(self.dtype, join_key(prefix, "dtype"))
        check(self.chunk_latent_frames is None or self.chunk_latent_frames >= 1, join_key(prefix, "chunk_latent_frames"),
              f"must be >= 1 or None, got {self.chunk_latent_frames}")
        check(self.tile_size is None or 0 <= self.tile_overlap < self.tile_size, join_key(prefix, "tile_overlap"),
              f"must be in [0, tile_size), got {self.tile_overlap}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype, "first_stage.dtype")


class FirstStage(nn.Module):
    """encode(video) -> normalised latents; decode(latents) -> video in [-1, 1]."""

    latent_channels: int
    temporal_compression: int
    spatial_compression: int

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FirstStage":
        # Frozen: stays in eval mode (no dropout) even inside a module being trained.
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F, h, w) of the latent of a (frames, height, width) video."""
        return (
            self.latent_channels,
            1 + (frames - 1) // self.temporal_compression,
            height // self.spatial_compression,
            width // self.spatial_compression,
        )

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_posterior(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The posterior in normalised latent space, (mean, log-variance), both float32 like ``encode``'s latents;
        None where there is none to give (a transformed stage: a channel-mixing transform makes it non-diagonal).
        A latent cache stores both so that training can draw z = mean + exp(logvar / 2) * eps at every step."""
        return None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def normalized_logvar(logvar: torch.Tensor, normalize) -> torch.Tensor:
    """The log-variance after the per-channel affine ``normalize`` (z -> a z + b): logvar + 2 log |a|."""
    shape = (1, logvar.shape[1]) + (1,) * (logvar.ndim - 2)
    ones = torch.ones(shape, dtype=torch.float32, device=logvar.device)
    scale = normalize(ones) - normalize(torch.zeros_like(ones))
    return logvar.float().clamp(-30.0, 20.0) + 2.0 * scale.abs().log()


class SSVAEFirstStage(FirstStage):
    """Our SSVAE; latents are (z - m) / s with the model's latent stats. Encoding follows the inference config
    (chunks, tiles); with `sample=True` it encodes the whole video in one pass and samples the posterior."""

    def __init__(self, model: SSVAE, inference: Optional[InferenceConfig] = None, sample: bool = False) -> None:
        super().__init__(model)
        self.inference = inference or InferenceConfig()
        self.inference.validate(model.spatial_compression)
        self.sample = sample
        self.latent_channels = model.z_channels
        self.temporal_compression = model.temporal_compression
        self.spatial_compression = model.spatial_compression

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        model: SSVAE = self.vae
        if not self.sample:
            return encode_video(model, video.to(self.dtype), self.inference)
        return model.normalize_latent(model.posterior(video.to(self.dtype)).sample().float())

    @torch.no_grad()
    def encode_posterior(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model: SSVAE = self.vae
        mean, logvar = encode_posterior_moments(model, video.to(self.dtype), self.inference).float().chunk(2, dim=1)
        return model.normalize_latent(mean), normalized_logvar(logvar, model.normalize_latent)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents.to(self.dtype), self.inference).clamp(-1, 1)


class TransformedFirstStage(FirstStage):
    """Another first stage seen through an invertible latent transform (``vae.latent_transform``): encode applies
    it, decode undoes it, so reconstructions equal the wrapped stage's up to float rounding."""

    def __init__(self, base: FirstStage, transform: nn.Module) -> None:
        super().__init__(base)  # the wrapped stage is self.vae
        self.transform = transform.eval().requires_grad_(False)
        self.latent_channels = base.latent_channels
        self.temporal_compression = base.temporal_compression
        self.spatial_compression = base.spatial_compression

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.transform(self.vae.encode(video).float())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self.transform.inverse(latents.float()))


class _DiffusersFirstStage(FirstStage):
    """Shared encode/decode of diffusers autoencoders; subclasses define the latent normalisation."""

    def __init__(self, vae: nn.Module, sample: bool = False) -> None:
        super().__init__(vae)
        self.sample = sample

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(video.to(self.dtype)).latent_dist
        z = dist.sample() if self.sample else dist.mode()
        return self.normalize(z.float())

    @torch.no_grad()
    def encode_posterior(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(video.to(self.dtype)).latent_dist
        return self.normalize(dist.mean.float()), normalized_logvar(dist.logvar, self.normalize)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        video = self.vae.decode(self.denormalize(latents.float()).to(self.dtype)).sample
        return video.float().clamp(-1, 1)


class WanFirstStage(_DiffusersFirstStage):
    """diffusers AutoencoderKLWan (2.1 or 2.2); latents normalised per channel with its config's
    latents_mean / latents_std, as the Wan pipelines do."""

    def __init__(self, vae: nn.Module, sample: bool = False) -> None:
        super().__init__(vae, sample)
        cfg = vae.config
        self.latent_channels = cfg.z_dim
        self.temporal_compression = cfg.scale_factor_temporal
        self.spatial_compression = cfg.scale_factor_spatial
        shape = (1, cfg.z_dim, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape))
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latents_mean) / self.latents_std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latents_std + self.latents_mean


class CogVideoXFirstStage(_DiffusersFirstStage):
    """diffusers AutoencoderKLCogVideoX; latents scaled by its config's scaling_factor (after shift_factor, if
    set). Its decoder only inverts the encoder for an odd number of latent frames (e.g. 49 frames -> 13)."""

    def __init__(self, vae: nn.Module, sample: bool = False) -> None:
        super().__init__(vae, sample)
        cfg = vae.config
        self.latent_channels = cfg.latent_channels
        self.temporal_compression = int(cfg.temporal_compression_ratio)
        self.spatial_compression = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor or 0.0)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scaling_factor + self.shift_factor


def _local_folder(path: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"first_stage.path: folder {folder} not found (only local folders are loaded)")
    return folder


def load_first_stage(config: FirstStageConfig, device: torch.device | str | None = None) -> FirstStage:
    config.validate()
    # The transform's file is checked first: it is cheap, and a missing one should not wait for a VAE to load.
    if config.latent_transform and not Path(config.latent_transform).is_file():
        raise FileNotFoundError(f"first_stage.latent_transform: {config.latent_transform} is not a file")
    stage = _load_base(config, device)
    if not config.latent_transform:
        return stage
    from vae.latent_transform import load_latent_transform

    transform = load_latent_transform(config.latent_transform)
    return TransformedFirstStage(stage, transform.to(device) if device is not None else transform)


def _load_base(config: FirstStageConfig, device: torch.device | str | None) -> FirstStage:
    folder = _local_folder(config.path)
    dtype = config.torch_dtype
    if config.kind == "ssvae":
        model = SSVAE.from_pretrained(folder, device=device, dtype=dtype)
        inference = InferenceConfig(
            chunk_latent_frames=config.chunk_latent_frames,
            tile_size=config.tile_size,
            tile_overlap=config.tile_overlap,
            bf16=dtype == torch.bfloat16,
        )
        return SSVAEFirstStage(model, inference, sample=config.sample)

    from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan

    if config.kind == "wan":
        vae = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        if config.tile_size is not None:
            stride = config.tile_size - config.tile_overlap
            vae.enable_tiling(config.tile_size, config.tile_size, stride, stride)
        stage: FirstStage = WanFirstStage(vae, sample=config.sample)
    else:
        vae = AutoencoderKLCogVideoX.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        if config.tile_size is not None:
            factor = config.tile_overlap / config.tile_size
            vae.enable_tiling(config.tile_size, config.tile_size, factor, factor)
        stage = CogVideoXFirstStage(vae, sample=config.sample)
    return stage.to(device) if device is not None else stage
