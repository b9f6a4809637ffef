"""Token and position embeddings of the CogVideoX transformer.

Every function here reproduces the diffusers computation it is named after (``CogVideoXPatchEmbed``,
``get_3d_sincos_pos_embed``, ``get_3d_rotary_pos_embed``, ``get_timestep_embedding``) so that a converted
checkpoint gives the same numbers; the quirks that matter for that are commented where they happen.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import DiTConfig


# ----------------------------------------------------------------------------------------------- patches


def patchify(latents: torch.Tensor, patch_size: int, patch_size_t: int) -> torch.Tensor:
    """(B, F, C, H, W) -> (B, F/pt * H/p * W/p, C*pt*p*p); tokens in (frame, row, column) order and the
    features of a token in (channel, time, row, column) order, the layout of diffusers' patch projection."""
    b, f, c, h, w = latents.shape
    p, pt = patch_size, patch_size_t
    if f % pt or h % p or w % p:
        raise ValueError(
            f"latents of {f} frames x {h} x {w} do not divide into patches of {pt} x {p} x {p} (patch_size_t, patch_size)"
        )
    x = latents.reshape(b, f // pt, pt, c, h // p, p, w // p, p)
    x = x.permute(0, 1, 4, 6, 3, 2, 5, 7)  # B, F', H', W', C, pt, p, p
    return x.reshape(b, (f // pt) * (h // p) * (w // p), c * pt * p * p)


def unpatchify(tokens: torch.Tensor, frames: int, height: int, width: int, patch_size: int, patch_size_t: int) -> torch.Tensor:
    """Inverse of ``patchify``: (B, N, C*pt*p*p) -> (B, F, C, H, W)."""
    b = tokens.shape[0]
    p, pt = patch_size, patch_size_t
    x = tokens.reshape(b, frames // pt, height // p, width // p, -1, pt, p, p)
    x = x.permute(0, 1, 5, 4, 2, 6, 3, 7)  # B, F', pt, C, H', p, W', p
    return x.reshape(b, frames, -1, height, width)


class PatchEmbed(nn.Module):
    """Projects video patches and text embeddings to the model width.

    diffusers uses a stride-p Conv2d for CogVideoX 1.0 and a Linear for 1.5; both are the same linear map of
    a patch, so one Linear serves both (conversion reshapes the conv kernel).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_size_t = config.temporal_patch
        patch_features = config.in_channels * config.temporal_patch * config.patch_size**2
        self.proj = nn.Linear(patch_features, config.inner_dim, bias=config.patch_bias)
        self.text_proj = nn.Linear(config.text_embed_dim, config.inner_dim)
        if config.positional_embedding == "learned":
            # One row per text slot and per video token at the base size, as in CogVideoX-5B-I2V.
            tokens = config.sample_frames * (config.sample_height // config.patch_size) * (config.sample_width // config.patch_size)
            self.pos_embedding = nn.Parameter(torch.zeros(1, config.max_text_seq_length + tokens, config.inner_dim))
        else:
            self.pos_embedding = None

    def forward(self, text_states: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (text tokens (B, L, D), video tokens (B, N, D))."""
        text = self.text_proj(text_states)
        video = self.proj(patchify(latents, self.patch_size, self.patch_size_t))
        if self.pos_embedding is not None:
            text_len = text.shape[1]
            max_text = self.pos_embedding.shape[1] - video.shape[1]
            if text_len != max_text:
                raise ValueError(
                    f"a learned positional table of {self.pos_embedding.shape[1]} rows needs {max_text} text tokens and "
                    f"{video.shape[1]} video tokens (the base size); got {text_len} text and {video.shape[1]} video tokens"
                )
            pos = self.pos_embedding.to(text.dtype)
            text = text + pos[:, :text_len]
            video = video + pos[:, text_len:]
        return text, video


# ------------------------------------------------------------------------------------------ 3D sin-cos


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) as [sin | cos] with frequencies 10000^(-i/(dim/2)), computed in float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = torch.outer(positions.reshape(-1).to(torch.float64), omega)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(dim: int, frames: int, height: int, width: int, spatial_scale: float, temporal_scale: float,
              device: torch.device | None = None) -> torch.Tensor:
    """(frames*height*width, dim) float32 table: [time dim/4 | column 3dim/8 | row 3dim/8] per token.

    diffusers' ``get_3d_sincos_pos_embed`` names its halves "h" then "w" but feeds them the column then the
    row coordinate (a meshgrid in "xy" order); the column-first layout here is what it actually computes.
    """
    spatial_dim = 3 * dim // 4
    rows = torch.arange(height, dtype=torch.float32, device=device) / spatial_scale
    cols = torch.arange(width, dtype=torch.float32, device=device) / spatial_scale
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    spatial = torch.cat([sincos_1d(spatial_dim // 2, grid_cols), sincos_1d(spatial_dim // 2, grid_rows)], dim=1)
    times = torch.arange(frames, dtype=torch.float32, device=device) / temporal_scale
    temporal = sincos_1d(dim // 4, times)
    table = torch.cat(
        [temporal[:, None, :].expand(-1, height * width, -1), spatial[None].expand(frames, -1, -1)], dim=-1
    )
    return table.reshape(frames * height * width, dim).float()


# ------------------------------------------------------------------------------------------ 3D rotary


def _rope_1d(dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (M, dim), each frequency repeated for the two members of a rotated pair."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    angles = torch.outer(positions, freqs)
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def _crop_region(grid: tuple[int, int], base_width: int, base_height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """diffusers' ``get_resize_crop_region_for_grid``: where a grid of another aspect ratio sits, fitted and
    centred, inside the base grid."""
    h, w = grid
    if h / w > base_height / base_width:
        resize_h, resize_w = base_height, int(round(base_height / h * w))
    else:
        resize_w, resize_h = base_width, int(round(base_width / w * h))
    top = int(round((base_height - resize_h) / 2.0))
    left = int(round((base_width - resize_w) / 2.0))
    return (top, left), (top + resize_h, left + resize_w)


def rope_3d(head_dim: int, frames: int, height: int, width: int, base_height: int, base_width: int,
            relative_grid: bool, theta: float = 10000.0, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (frames*height*width, head_dim) for the video tokens; head split 1/4 time, 3/8 row,
    3/8 column.

    relative_grid=True is CogVideoX 1.0: rows and columns are spread over the crop region of the base grid
    (so a smaller video sees positions of the same range); False is 1.5: integer positions.
    """
    if relative_grid:
        (top, left), (bottom, right) = _crop_region((height, width), base_width, base_height)
        rows = torch.linspace(top, bottom * (height - 1) / height, height, dtype=torch.float32, device=device)
        cols = torch.linspace(left, right * (width - 1) / width, width, dtype=torch.float32, device=device)
        times = torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32, device=device)
    else:
        rows = torch.arange(height, dtype=torch.float32, device=device)
        cols = torch.arange(width, dtype=torch.float32, device=device)
        times = torch.arange(frames, dtype=torch.float32, device=device)
    dim_t, dim_s = head_dim // 4, head_dim // 8 * 3
    parts = [_rope_1d(dim_t, times, theta), _rope_1d(dim_s, rows, theta), _rope_1d(dim_s, cols, theta)]

    def grid(t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                t[:, None, None].expand(-1, height, width, -1),
                h[None, :, None].expand(frames, -1, width, -1),
                w[None, None, :].expand(frames, height, -1, -1),
            ],
            dim=-1,
        ).reshape(frames * height * width, head_dim)

    cos = grid(*(p[0] for p in parts))
    sin = grid(*(p[1] for p in parts))
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates consecutive pairs (x0, x1) of the last axis of x (B, heads, S, D) by the angles of (S, D)
    cos/sin, in float32."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ------------------------------------------------------------------------------------------- timesteps


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) float32 sinusoids ([cos | sin] when flip_sin_to_cos), as diffusers' Timesteps."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    angles = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoids -> Linear -> SiLU -> Linear (diffusers' TimestepEmbedding with key names linear_1/linear_2)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
