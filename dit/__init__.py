"""CogVideoX-style text-to-video diffusion transformer, its conversions, diffusion process and samplers."""

from .attention import AttentionFn, get_attention_fn, sdpa_attention, set_attention_fn
from .config import DiTConfig
from .convert import (
    config_from_diffusers,
    diffusers_config,
    export_diffusers,
    export_sat,
    from_diffusers,
    from_sat,
)
from .diffusion import DiffusionConfig, VPrediction, alphas_cumprod, drop_text, training_loss
from .samplers import dynamic_guidance_scale, make_scheduler, sample
from .sequence_parallel import UlyssesTransformer, apply_ulysses, enable_ulysses, ulysses_forward
from .transformer import CogVideoXTransformer

__all__ = [
    "AttentionFn",
    "CogVideoXTransformer",
    "DiTConfig",
    "DiffusionConfig",
    "VPrediction",
    "alphas_cumprod",
    "config_from_diffusers",
    "diffusers_config",
    "drop_text",
    "dynamic_guidance_scale",
    "UlyssesTransformer",
    "apply_ulysses",
    "enable_ulysses",
    "export_diffusers",
    "export_sat",
    "from_diffusers",
    "from_sat",
    "get_attention_fn",
    "make_scheduler",
    "sample",
    "sdpa_attention",
    "set_attention_fn",
    "training_loss",
    "ulysses_forward",
]
