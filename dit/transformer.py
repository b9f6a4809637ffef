"""CogVideoX-style diffusion transformer.

Video latents (B, F, C, H, W) are patchified into tokens, text embeddings (B, L, text_embed_dim) are
projected to the same width and put in front, and every block runs full 3D self-attention over both. Text
and video tokens share the attention and MLP weights but each has its own timestep-conditioned LayerNorm
modulation ("expert" adaptive LayerNorm). Module and parameter names follow diffusers'
``CogVideoXTransformer3DModel`` so checkpoints convert by renaming (``dit/convert.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, get_attention_fn
from .config import DiTConfig
from .embeddings import PatchEmbed, TimestepEmbedding, rope_3d, sincos_3d, timestep_embedding, unpatchify


class Tokens(NamedTuple):
    """The state the blocks work on: video tokens (B, N, D), text tokens (B, L, D), timestep embedding
    (B, time_embed_dim), rotary (cos, sin) of the video tokens or None, key mask (B, L + N) or None."""

    video: torch.Tensor
    text: torch.Tensor
    temb: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None
    key_mask: torch.Tensor | None


class ExpertAdaLayerNorm(nn.Module):
    """LayerNorm whose shift, scale and gate come from the timestep embedding, separately for video and text
    tokens (diffusers' CogVideoXLayerNormZero). Output chunk order: video shift, scale, gate, text shift,
    scale, gate."""

    def __init__(self, cond_dim: int, dim: int, elementwise_affine: bool, eps: float):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(cond_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, video: torch.Tensor, text: torch.Tensor, temb: torch.Tensor):
        shift, scale, gate, t_shift, t_scale, t_gate = self.linear(self.silu(temb))[:, None].chunk(6, dim=-1)
        video = self.norm(video) * (1 + scale) + shift
        text = self.norm(text) * (1 + t_scale) + t_shift
        return video, text, gate, t_gate


class GELUProjection(nn.Module):
    """Linear followed by tanh-approximated GELU (diffusers' GELU(approximate="tanh"), key ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float, mult: int = 4):
        super().__init__()
        # Indices 0 and 2 hold the weights, as in diffusers (ff.net.0.proj, ff.net.2).
        self.net = nn.Sequential(GELUProjection(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CogVideoXBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.inner_dim
        self.norm1 = ExpertAdaLayerNorm(config.time_embed_dim, dim, config.norm_elementwise_affine, config.norm_eps)
        self.attn1 = Attention(
            dim, config.num_attention_heads, config.attention_head_dim, config.attention_bias, config.qk_norm,
            config.dropout, get_attention_fn(config.attention_backend),
        )
        self.norm2 = ExpertAdaLayerNorm(config.time_embed_dim, dim, config.norm_elementwise_affine, config.norm_eps)
        self.ff = FeedForward(dim, config.dropout)

    def forward(self, video: torch.Tensor, text: torch.Tensor, temb: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None, key_mask: torch.Tensor | None):
        norm_video, norm_text, gate, text_gate = self.norm1(video, text, temb)
        attn_video, attn_text = self.attn1(norm_video, norm_text, rope, key_mask)
        video = video + gate * attn_video
        text = text + text_gate * attn_text

        norm_video, norm_text, gate, text_gate = self.norm2(video, text, temb)
        text_len = text.shape[1]
        ff = self.ff(torch.cat([norm_text, norm_video], dim=1))
        video = video + gate * ff[:, text_len:]
        text = text + text_gate * ff[:, :text_len]
        return video, text


class FinalAdaLayerNorm(nn.Module):
    """LayerNorm modulated by the timestep embedding, chunk order (shift, scale) (diffusers' AdaLayerNorm
    with chunk_dim=1)."""

    def __init__(self, cond_dim: int, dim: int, elementwise_affine: bool, eps: float):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(cond_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(self.silu(temb))[:, None].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


DIT_INITS = ("default", "adaln_zero")


def adaln_zero_init(model: "CogVideoXTransformer") -> None:
    """DiT's adaLN-Zero: zero every block's modulation (shift, scale and gate of attention and MLP) and the output
    projection, so every block starts as the identity and the model's first prediction is 0."""
    for module in model.modules():
        if isinstance(module, ExpertAdaLayerNorm):
            nn.init.zeros_(module.linear.weight)
            nn.init.zeros_(module.linear.bias)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)


class CogVideoXTransformer(nn.Module):
    """forward(latents (B, F, C, H, W), text_states (B, L, text_embed_dim), timestep (B,) integers,
    text_mask (B, L) bool or None) -> prediction (B, F, out_channels, H, W); with the v-prediction
    diffusion of ``dit/diffusion.py`` the prediction is the velocity v."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config.validate()
        dim = config.inner_dim
        self.patch_embed = PatchEmbed(config)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.time_embedding = TimestepEmbedding(dim, config.time_embed_dim)
        self.transformer_blocks = nn.ModuleList(CogVideoXBlock(config) for _ in range(config.num_layers))
        self.norm_final = nn.LayerNorm(dim, config.norm_eps, config.norm_elementwise_affine)
        self.norm_out = FinalAdaLayerNorm(config.time_embed_dim, dim, config.norm_elementwise_affine, config.norm_eps)
        self.proj_out = nn.Linear(dim, config.output_channels * config.temporal_patch * config.patch_size**2)
        self.gradient_checkpointing = config.gradient_checkpointing
        self._position_cache: dict[tuple, object] = {}

    def positions(self, frames: int, height: int, width: int, device: torch.device):
        """For a token grid of frames x height x width: the sin-cos table (N, D) to add to the video tokens,
        or the rotary (cos, sin) pair (N, head_dim); cached per grid, as they are constant."""
        cfg = self.config
        key = (frames, height, width, str(device))
        if key not in self._position_cache:
            if cfg.positional_embedding == "sincos":
                value = sincos_3d(cfg.inner_dim, frames, height, width, cfg.spatial_interpolation_scale,
                                  cfg.temporal_interpolation_scale, device=device)
            else:
                value = rope_3d(cfg.attention_head_dim, frames, height, width, cfg.sample_height // cfg.patch_size,
                                cfg.sample_width // cfg.patch_size, relative_grid=cfg.patch_size_t is None,
                                theta=cfg.rope_theta, device=device)
            self._position_cache[key] = value
        return self._position_cache[key]

    def embed(self, latents: torch.Tensor, text_states: torch.Tensor, timestep: torch.Tensor,
              text_mask: torch.Tensor | None = None) -> Tokens:
        """Everything before the blocks: timestep embedding, patch and text projections, positions."""
        cfg = self.config
        if latents.ndim != 5 or latents.shape[2] != cfg.in_channels:
            raise ValueError(f"latents must be (B, F, {cfg.in_channels}, H, W), got {tuple(latents.shape)}")
        if text_states.ndim != 3 or text_states.shape[-1] != cfg.text_embed_dim:
            raise ValueError(f"text_states must be (B, L, {cfg.text_embed_dim}), got {tuple(text_states.shape)}")
        b, frames, _, height, width = latents.shape
        timestep = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(b)

        temb = self.time_embedding(timestep_embedding(timestep, cfg.inner_dim, cfg.flip_sin_to_cos, cfg.freq_shift).to(latents.dtype))
        text, video = self.patch_embed(text_states, latents)
        grid = (frames // cfg.temporal_patch, height // cfg.patch_size, width // cfg.patch_size)
        rope = None
        if cfg.positional_embedding == "sincos":
            video = video + self.positions(*grid, latents.device).to(video.dtype)
        else:
            rope = self.positions(*grid, latents.device)
        text, video = self.embedding_dropout(text), self.embedding_dropout(video)

        key_mask = None
        if text_mask is not None:
            if text_mask.shape != text_states.shape[:2]:
                raise ValueError(f"text_mask must be (B, L) = {tuple(text_states.shape[:2])}, got {tuple(text_mask.shape)}")
            key_mask = torch.cat([text_mask.bool(), text_mask.new_ones(b, video.shape[1], dtype=torch.bool)], dim=1)
        return Tokens(video, text, temb, rope, key_mask)

    def run_blocks(self, tokens: Tokens) -> Tokens:
        video, text = tokens.video, tokens.text
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                video, text = checkpoint(block, video, text, tokens.temb, tokens.rope, tokens.key_mask, use_reentrant=False)
            else:
                video, text = block(video, text, tokens.temb, tokens.rope, tokens.key_mask)
        return tokens._replace(video=video, text=text)

    def head(self, video: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Final modulated norm and projection: video tokens (B, N, D) -> patches (B, N, C*pt*p*p)."""
        return self.proj_out(self.norm_out(self.norm_final(video), temb))

    def forward(self, latents: torch.Tensor, text_states: torch.Tensor, timestep: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.run_blocks(self.embed(latents, text_states, timestep, text_mask))
        _, frames, _, height, width = latents.shape
        cfg = self.config
        return unpatchify(self.head(tokens.video, tokens.temb), frames, height, width, cfg.patch_size, cfg.temporal_patch)
