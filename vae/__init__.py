"""SSVAE: the video VAE, its released-weight loader, chunked/tiled inference and the first-stage interface."""

from vae.config import DecoderConfig, EncoderConfig, SSVAEConfig
from vae.first_stage import FirstStage, FirstStageConfig, load_first_stage
from vae.inference import InferenceConfig, decode_latents, encode_video
from vae.model import SSVAE
from vae.official import load_official
from vae.posterior import DiagonalGaussian

__all__ = [
    "DecoderConfig",
    "DiagonalGaussian",
    "EncoderConfig",
    "FirstStage",
    "FirstStageConfig",
    "InferenceConfig",
    "SSVAE",
    "SSVAEConfig",
    "decode_latents",
    "encode_video",
    "load_first_stage",
    "load_official",
]
