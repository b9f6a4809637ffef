"""The SSVAE: causal 3D conv encoder/decoder, Gaussian posterior, learned LMR mask token, latent normalisation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vae.config import SSVAEConfig
from vae.decoder import Decoder
from vae.encoder import Encoder
from vae.posterior import DiagonalGaussian

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class SSVAE(nn.Module):
    """Video (B, 3, 1 + 4k, 16h, 16w) in [-1, 1] <-> latent (B, 48, 1 + k, h, w) (released sizes).

    `encode`/`decode` work in the normalised latent space ((mean - m) / s, per channel), which is what a
    diffusion model sees; `posterior` and `decoder(z)` work on raw latents, which is what VAE training uses.
    """

    def __init__(self, config: Optional[SSVAEConfig] = None) -> None:
        super().__init__()
        config = config or SSVAEConfig()
        config.validate()
        self.config = config
        self.encoder = Encoder(config.encoder)
        self.decoder = Decoder(config.decoder)
        z = config.z_channels
        # Learned value of masked latent positions in LMR (vae.lmr).
        self.mask_token = nn.Parameter(torch.randn(1, z, 1, 1, 1))
        mean = torch.zeros(z) if config.latent_mean is None else torch.tensor(config.latent_mean, dtype=torch.float32)
        std = torch.ones(z) if config.latent_std is None else torch.tensor(config.latent_std, dtype=torch.float32)
        self.register_buffer("latent_mean", mean.view(1, z, 1, 1, 1))
        self.register_buffer("latent_std", std.view(1, z, 1, 1, 1))

    # ---- shapes -------------------------------------------------------------------------------------------
    @property
    def z_channels(self) -> int:
        return self.config.z_channels

    @property
    def temporal_compression(self) -> int:
        return self.config.temporal_compression

    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_compression

    def check_video(self, x: torch.Tensor) -> None:
        """Raise ValueError naming what is wrong with a video batch for encoding."""
        channels, tc, sc = self.config.encoder.in_channels, self.temporal_compression, self.spatial_compression
        if x.ndim != 5:
            raise ValueError(f"video must be (B, C, T, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(f"video must have {channels} channels (dim 1), got {x.shape[1]}")
        if (x.shape[2] - 1) % tc:
            raise ValueError(f"video frame count T must be 1 + {tc}k (1, {1 + tc}, {1 + 2 * tc}, ...), got {x.shape[2]}")
        if x.shape[3] % sc or x.shape[4] % sc:
            raise ValueError(f"video height and width must be multiples of {sc}, got {x.shape[3]}x{x.shape[4]}")

    def check_latent(self, z: torch.Tensor) -> None:
        if z.ndim != 5:
            raise ValueError(f"latent must be (B, C, F, h, w), got shape {tuple(z.shape)}")
        if z.shape[1] != self.z_channels:
            raise ValueError(f"latent must have {self.z_channels} channels (dim 1), got {z.shape[1]}")

    # ---- encoding / decoding ------------------------------------------------------------------------------
    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Raw encoder output: 2*z channels (mean, then log-variance)."""
        self.check_video(x)
        return self.encoder(x)

    def posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.encode_moments(x))

    def normalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_mean.to(z.dtype)) / self.latent_std.to(z.dtype)

    def denormalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std.to(z.dtype) + self.latent_mean.to(z.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised posterior mean, (mean - m) / s."""
        return self.normalize_latent(self.posterior(x).mode())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Video from a normalised latent: decoder(z * s + m)."""
        self.check_latent(z)
        return self.decoder(self.denormalize_latent(z))

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """A raw (un-normalised) latent -> video: the decoder alone, what training decodes."""
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample: bool = True, generator: Optional[torch.Generator] = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Plain autoencoding of raw latents (no LMR): returns (reconstruction, posterior)."""
        posterior = self.posterior(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decoder(z), posterior

    def set_latent_stats(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> None:
        """Set the per-channel m and s of encode()/decode() (and the config, so save_pretrained keeps them)."""
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        for name, value in (("mean", mean), ("std", std)):
            if value.numel() != self.z_channels:
                raise ValueError(f"latent {name} needs {self.z_channels} values, got {value.numel()}")
        if (std <= 0).any():
            raise ValueError("latent std values must be > 0")
        self.latent_mean.copy_(mean.view_as(self.latent_mean))
        self.latent_std.copy_(std.view_as(self.latent_std))
        self.config = replace(self.config, latent_mean=tuple(mean.tolist()), latent_std=tuple(std.tolist()))

    # ---- last layers for adaptive loss weights ------------------------------------------------------------
    @property
    def encoder_last_layer(self) -> nn.Parameter:
        return self.encoder.last_layer

    @property
    def decoder_last_layer(self) -> nn.Parameter:
        return self.decoder.last_layer

    # ---- persistence --------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """Write `config.json` and `model.safetensors` (weights, mask token, latent stats) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": type(self).__name__, **self.config.to_dict()}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "SSVAE":
        """Load what save_pretrained wrote. Local folders only."""
        folder = Path(folder)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} not found (from_pretrained takes a local folder)")
        config = json.loads((folder / CONFIG_NAME).read_text())
        class_name = config.pop("_class_name", cls.__name__)
        if class_name != cls.__name__:
            raise ValueError(f"{folder / CONFIG_NAME} describes a {class_name}, not an {cls.__name__}")
        with torch.device("meta"):
            model = cls(SSVAEConfig.from_dict(config))
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)), strict=True, assign=True)
        return model.to(device=device, dtype=dtype)
