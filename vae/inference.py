"""Encoding and decoding long, large videos: temporal chunks with cached causal context, spatial tiles with
blended overlaps, optional bf16 autocast on GPU.

Temporal chunking is exact: every causal conv keeps the input frames the next chunk's first outputs need (see
`vae.causal_conv`), and the resampling layers know whether a chunk is the video's first, so chunked results equal
one whole pass up to float rounding. Spatial tiling is an approximation (each tile sees only its own pixels); the
overlaps are blended with linear ramps to hide seams.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from vae.causal_conv import Streamable
from vae.model import SSVAE


@dataclass
class InferenceConfig:
    # Latent frames per temporal chunk (encode: the first chunk is 1 + 4(n-1) frames, then 4n frames); None = whole.
    chunk_latent_frames: Optional[int] = None
    # Spatial tile edge in pixels (a multiple of the spatial compression); None = whole frames.
    tile_size: Optional[int] = None
    # Pixels shared by neighbouring tiles, blended linearly (a multiple of the spatial compression).
    tile_overlap: int = 64
    # bf16 autocast when the tensors are on CUDA (ignored on CPU).
    bf16: bool = False

    def validate(self, spatial_compression: int = 16) -> None:
        if self.chunk_latent_frames is not None and self.chunk_latent_frames < 1:
            raise ValueError(f"chunk_latent_frames must be >= 1 or None, got {self.chunk_latent_frames}")
        if self.tile_size is not None:
            if self.tile_size <= 0 or self.tile_size % spatial_compression:
                raise ValueError(f"tile_size must be a positive multiple of {spatial_compression}, got {self.tile_size}")
            if not 0 <= self.tile_overlap < self.tile_size or self.tile_overlap % spatial_compression:
                raise ValueError(
                    f"tile_overlap must be a multiple of {spatial_compression} in [0, tile_size), got {self.tile_overlap}"
                )


@contextmanager
def causal_streaming(module: nn.Module) -> Iterator[None]:
    """Within this block, successive calls of `module` on consecutive temporal chunks act as one call on the
    whole video. State is cleared on entry and exit."""
    layers = [m for m in module.modules() if isinstance(m, Streamable)]
    for layer in layers:
        layer.reset_stream()
        layer.streaming = True
    try:
        yield
    finally:
        for layer in layers:
            layer.streaming = False
            layer.reset_stream()


def _autocast(x: torch.Tensor, bf16: bool):
    if bf16 and x.is_cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def encode_moments_chunked(model: SSVAE, video: torch.Tensor, chunk_latent_frames: int) -> torch.Tensor:
    """Encoder moments of `video`, computed `chunk_latent_frames` latent frames at a time."""
    tc = model.temporal_compression
    first = 1 + tc * (chunk_latent_frames - 1)
    bounds = [0, min(first, video.shape[2])]
    while bounds[-1] < video.shape[2]:
        bounds.append(min(bounds[-1] + tc * chunk_latent_frames, video.shape[2]))
    with causal_streaming(model.encoder):
        parts = [model.encoder(video[:, :, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, dim=2)


def decode_raw_chunked(model: SSVAE, z: torch.Tensor, chunk_latent_frames: int) -> torch.Tensor:
    """Decoder output for raw (un-normalised) latents, `chunk_latent_frames` latent frames at a time."""
    with causal_streaming(model.decoder):
        parts = [model.decoder(z[:, :, i : i + chunk_latent_frames]) for i in range(0, z.shape[2], chunk_latent_frames)]
    return torch.cat(parts, dim=2)


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp(length: int, ramp: int, left: bool, right: bool) -> torch.Tensor:
    """1 inside, rising linearly over `ramp` samples at the sides that border another tile."""
    w = torch.ones(length)
    if ramp > 0:
        up = torch.arange(1, ramp + 1, dtype=torch.float32) / (ramp + 1)
        n = min(ramp, length)
        if left:
            w[:n] = torch.minimum(w[:n], up[:n])
        if right:
            w[length - n :] = torch.minimum(w[length - n :], up[:n].flip(0))
    return w


def blend_tiles(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, scale: Fraction
) -> torch.Tensor:
    """Apply `fn` to overlapping (tile x tile) crops of x's last two dims and blend the outputs, whose spatial
    size is `scale` times the crop's, with linear ramps over the overlaps."""
    h, w = x.shape[-2:]
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    out = weight = None
    ramp = int(overlap * scale)
    for y0 in ys:
        for x0 in xs:
            th, tw = min(tile, h), min(tile, w)
            y = fn(x[..., y0 : y0 + th, x0 : x0 + tw])
            oy, ox, oh, ow = int(y0 * scale), int(x0 * scale), y.shape[-2], y.shape[-1]
            if out is None:
                out = y.new_zeros(*y.shape[:-2], int(h * scale), int(w * scale))
                weight = y.new_zeros(int(h * scale), int(w * scale))
            wy = _ramp(oh, ramp, y0 > 0, y0 + th < h)
            wx = _ramp(ow, ramp, x0 > 0, x0 + tw < w)
            mask = (wy[:, None] * wx[None, :]).to(y)
            out[..., oy : oy + oh, ox : ox + ow] += y * mask
            weight[oy : oy + oh, ox : ox + ow] += mask
    return out / weight


@torch.no_grad()
def encode_video(model: SSVAE, video: torch.Tensor, config: Optional[InferenceConfig] = None) -> torch.Tensor:
    """Normalised latent (posterior mean) of `video`, chunked and/or tiled as configured."""
    mean = encode_posterior_moments(model, video, config)[:, : model.z_channels].float()
    return model.normalize_latent(mean)


@torch.no_grad()
def encode_posterior_moments(model: SSVAE, video: torch.Tensor, config: Optional[InferenceConfig] = None) -> torch.Tensor:
    """The encoder's raw moments (B, 2z, ...) (posterior mean, then log-variance) of `video`, chunked and/or tiled as
    configured."""
    config = config or InferenceConfig()
    config.validate(model.spatial_compression)
    model.check_video(video)

    def moments(x: torch.Tensor) -> torch.Tensor:
        if config.chunk_latent_frames is None:
            return model.encoder(x)
        return encode_moments_chunked(model, x, config.chunk_latent_frames)

    with _autocast(video, config.bf16):
        if config.tile_size is None:
            m = moments(video)
        else:
            m = blend_tiles(moments, video, config.tile_size, config.tile_overlap, Fraction(1, model.spatial_compression))
    return m


@torch.no_grad()
def decode_latents(model: SSVAE, latents: torch.Tensor, config: Optional[InferenceConfig] = None) -> torch.Tensor:
    """Video from normalised latents, chunked and/or tiled as configured (tile sizes in output pixels)."""
    config = config or InferenceConfig()
    config.validate(model.spatial_compression)
    model.check_latent(latents)
    sc = model.spatial_compression
    z = model.denormalize_latent(latents)

    def decode(x: torch.Tensor) -> torch.Tensor:
        if config.chunk_latent_frames is None:
            return model.decoder(x)
        return decode_raw_chunked(model, x, config.chunk_latent_frames)

    with _autocast(z, config.bf16):
        if config.tile_size is None:
            video = decode(z)
        else:
            video = blend_tiles(decode, z, config.tile_size // sc, config.tile_overlap // sc, Fraction(sc))
    return video.float()
