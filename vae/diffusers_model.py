"""The SSVAE as a diffusers model: ``AutoencoderKLSSVAE`` (``ModelMixin`` + ``ConfigMixin``).

It is our ``SSVAE``'s modules behind diffusers' interface, not a copy of them: the same ``Encoder``/``Decoder``
classes and weight names (``encoder.*``, ``decoder.*``), so our checkpoints, the released one and this folder hold
the same tensors. What diffusers users expect:

- ``from_pretrained`` / ``save_pretrained`` in diffusers' layout (``config.json`` + ``diffusion_pytorch_model
  .safetensors``);
- ``encode(x).latent_dist`` (a ``DiagonalGaussianDistribution``: ``sample()``, ``mode()``) and ``decode(z).sample``,
  on *raw* latents, with the per-channel ``latents_mean`` / ``latents_std`` in the config for the pipeline to apply,
  as ``AutoencoderKLWan`` does (``(z - mean) / std`` is what a DiT trains on);
- ``enable_tiling()`` / ``enable_slicing()``, backed by our exact temporal chunking and blended spatial tiles
  (``vae.inference``).

``python -m vae.convert_diffusers`` writes such a folder from one of our SSVAE folders or the released checkpoint.
"""
from __future__ import annotations

import json
from fractions import Fraction
from typing import Optional, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from vae.config import SSVAEConfig
from vae.inference import InferenceConfig, blend_tiles, decode_raw_chunked, encode_moments_chunked
from vae.model import SSVAE


class AutoencoderKLSSVAE(ModelMixin, ConfigMixin):
    """Video (B, 3, 1 + 4k, H, W) in [-1, 1] <-> raw latent (B, z, 1 + k, H/16, W/16) (released sizes)."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, encoder_config: Optional[dict] = None, decoder_config: Optional[dict] = None,
                 latents_mean: Optional[Sequence[float]] = None, latents_std: Optional[Sequence[float]] = None,
                 tile_sample_size: int = 256, tile_sample_overlap: int = 64, chunk_latent_frames: int = 4):
        super().__init__()
        cfg = SSVAEConfig.from_dict({"encoder": dict(encoder_config or {}), "decoder": dict(decoder_config or {})})
        cfg.validate()
        self.ssvae_config = cfg
        # The same module classes (and so weight names) as vae.model.SSVAE.
        model = SSVAE(cfg)
        self.encoder, self.decoder = model.encoder, model.decoder
        self.mask_token = nn.Parameter(model.mask_token.detach().clone())  # kept so conversions are lossless
        self.use_tiling = self.use_slicing = False

    # ---- what diffusers pipelines call --------------------------------------------------------------------
    @property
    def spatial_compression_ratio(self) -> int:
        return self.ssvae_config.spatial_compression

    @property
    def temporal_compression_ratio(self) -> int:
        return self.ssvae_config.temporal_compression

    def enable_tiling(self, tile_sample_size: Optional[int] = None, tile_sample_overlap: Optional[int] = None) -> None:
        """Encode and decode in temporal chunks (exact) and blended spatial tiles (for frames larger than a tile)."""
        if tile_sample_size is not None or tile_sample_overlap is not None:
            self.register_to_config(tile_sample_size=tile_sample_size or self.config.tile_sample_size,
                                    tile_sample_overlap=self.config.tile_sample_overlap if tile_sample_overlap is None
                                    else tile_sample_overlap)
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Encode and decode a batch one video at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def _inference_config(self, height: int, width: int) -> InferenceConfig:
        if not self.use_tiling:
            return InferenceConfig()
        tile = self.config.tile_sample_size
        large = max(height, width) > tile
        return InferenceConfig(chunk_latent_frames=self.config.chunk_latent_frames, tile_size=tile if large else None,
                               tile_overlap=self.config.tile_sample_overlap)

    def _per_video(self, fn, x: torch.Tensor) -> torch.Tensor:
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([fn(part) for part in x.split(1)])
        return fn(x)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder moments (mean, then log-variance): whole, or in exact temporal chunks and blended tiles."""
        cfg = self._inference_config(x.shape[-2], x.shape[-1])
        if cfg.chunk_latent_frames is None:
            return self.encoder(x)
        view = _SSVAEView(self)

        def moments(part: torch.Tensor) -> torch.Tensor:
            return encode_moments_chunked(view, part, cfg.chunk_latent_frames)

        if cfg.tile_size is None:
            return moments(x)
        return blend_tiles(moments, x, cfg.tile_size, cfg.tile_overlap, Fraction(1, self.spatial_compression_ratio))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        _SSVAEView(self).check_video(x)
        moments = self._per_video(self._moments, x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        sc = self.spatial_compression_ratio
        cfg = self._inference_config(z.shape[-2] * sc, z.shape[-1] * sc)
        if cfg.chunk_latent_frames is None:
            return self.decoder(z)
        view = _SSVAEView(self)

        def decode(part: torch.Tensor) -> torch.Tensor:
            return decode_raw_chunked(view, part, cfg.chunk_latent_frames)

        if cfg.tile_size is None:
            return decode(z)
        return blend_tiles(decode, z, cfg.tile_size // sc, cfg.tile_overlap // sc, Fraction(sc))

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        _SSVAEView(self).check_latent(z)
        video = self._per_video(self._decode, z)
        return DecoderOutput(sample=video) if return_dict else (video,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False,
                generator: Optional[torch.Generator] = None, return_dict: bool = True):
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)

    # ---- to and from our SSVAE ----------------------------------------------------------------------------
    @classmethod
    def from_ssvae(cls, model: SSVAE, **options) -> "AutoencoderKLSSVAE":
        cfg = json.loads(json.dumps(model.config.to_dict()))  # JSON-native (lists), as the saved config reads back
        stats = {k: None if cfg[f"latent_{k}"] is None else list(cfg[f"latent_{k}"]) for k in ("mean", "std")}
        out = cls(encoder_config=cfg["encoder"], decoder_config=cfg["decoder"], latents_mean=stats["mean"],
                  latents_std=stats["std"], **options)
        own = {k: v for k, v in model.state_dict().items() if k not in ("latent_mean", "latent_std")}
        out.load_state_dict(own, strict=True)
        dtype = next(model.parameters()).dtype
        return out if dtype == out.dtype else out.to(dtype)

    def to_ssvae(self) -> SSVAE:
        cfg = SSVAEConfig.from_dict({"encoder": dict(self.config.encoder_config or {}),
                                     "decoder": dict(self.config.decoder_config or {}),
                                     "latent_mean": self.config.latents_mean, "latent_std": self.config.latents_std})
        model = SSVAE(cfg)
        missing, unexpected = model.load_state_dict(self.state_dict(), strict=False)
        if unexpected or set(missing) - {"latent_mean", "latent_std"}:  # the statistics come from the config
            raise ValueError(f"weights do not fit an SSVAE: missing {missing}, unexpected {unexpected}")
        return model.to(self.dtype)


class _SSVAEView:
    """What vae.inference and SSVAE's input checks read of a model, over the diffusers model's own modules."""

    def __init__(self, model: AutoencoderKLSSVAE):
        self.encoder, self.decoder, self.config = model.encoder, model.decoder, model.ssvae_config
        self.z_channels = self.config.z_channels
        self.spatial_compression = self.config.spatial_compression
        self.temporal_compression = self.config.temporal_compression

    def check_video(self, x: torch.Tensor) -> None:
        SSVAE.check_video(self, x)

    def check_latent(self, z: torch.Tensor) -> None:
        SSVAE.check_latent(self, z)
