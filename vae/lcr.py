"""LCR (Local Correlation Regularization): push neighbouring latent vectors to be correlated.

SSVAE biases the latent spectrum towards low frequencies by asking that latent vectors inside small spatio-temporal
windows point the same way. This module measures that local correlation on the posterior mean and turns it into the
hinge penalty of SPEC-ssvae.md ("LCR"):

1. normalise each channel by its mean and std over (B, F, H, W); the statistics are detached, so the penalty cannot be
   lowered by rescaling channels;
2. cut the latent into (tw, hw, ww) windows: frame 0 (the image, or a video's separately coded first frame) uses
   hw x ww spatial windows, frames 1..F-1 use tw x hw x ww spatio-temporal windows;
3. centre each position's C-vector, scale it to unit norm, and average the cosine similarity over all distinct pairs
   of positions in a window, then over windows and batch: image_corr (frame 0) and video_corr (later frames);
   avg_corr = (image_corr + video_corr) / 2, or image_corr alone when there is no later frame.

Shapes not divisible by the window: the reference implementation asserts that H, W and F-1 are multiples of the
window; the golden latent (2, 48, 5, 8, 8) is. Here trailing rows, columns and frames that do not fill a whole window
are left out (the result equals the reference's whenever the reference accepts the shape), so e.g. a 13-frame clip
(F-1 = 3) still trains; a latent smaller than one spatial window raises ValueError, and a video with fewer than tw
frames after frame 0 is measured as an image (video_corr is None).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from infra.zero3 import side_passes_are_collective
from vae.adaptive_weight import adaptive_weight

# The released loss multiplies the configured LCR weight by this fixed factor (0.1 * 0.02 in the released recipe).
LCR_WEIGHT_SCALE = 0.1
# Added to the detached per-channel std before dividing, and to vector norms before normalising (reference values).
CHANNEL_STD_EPS = 1e-6
VECTOR_NORM_EPS = 1e-8


@dataclass
class LCRConfig:
    """The LCR term of the VAE loss (stage 1 of the released recipe has it on, stage 2 off)."""

    enabled: bool = True
    weight: float = 0.02  # w in 0.1 * w * adaptive_factor * relu(thresh - avg_corr)
    thresh: float = 0.75
    window: list[int] = field(default_factory=lambda: [2, 2, 2])  # (tw, hw, ww) in latent positions
    max_adaptive_weight: float = 1e8

    def validate(self, prefix: str = "lcr") -> None:
        if self.weight < 0:
            raise ValueError(f"{prefix}.weight: must be >= 0, got {self.weight}")
        if not -1.0 <= self.thresh <= 1.0:
            raise ValueError(f"{prefix}.thresh: a correlation threshold must be in [-1, 1], got {self.thresh}")
        if len(self.window) != 3 or any(int(s) < 1 for s in self.window):
            raise ValueError(f"{prefix}.window: must be three positive sizes (t, h, w), got {list(self.window)}")
        if self.window[1] * self.window[2] < 2:
            raise ValueError(f"{prefix}.window: a spatial window needs at least 2 positions, got {list(self.window)}")
        if self.max_adaptive_weight <= 0:
            raise ValueError(f"{prefix}.max_adaptive_weight: must be > 0, got {self.max_adaptive_weight}")


def normalize_channels(z: torch.Tensor) -> torch.Tensor:
    """Standardise each channel of (B, C, F, H, W) over (B, F, H, W) with detached mean and (unbiased) std."""
    dims = (0, 2, 3, 4)
    mean = z.mean(dims, keepdim=True).detach()
    std = z.std(dims, keepdim=True).detach()
    return (z - mean) / (std + CHANNEL_STD_EPS)


def mean_pairwise_cosine(vectors: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over all distinct pairs of centred vectors: (N windows, P positions, C) -> scalar."""
    centred = vectors - vectors.mean(dim=-1, keepdim=True)
    unit = centred / (torch.linalg.vector_norm(centred, dim=-1, keepdim=True) + VECTOR_NORM_EPS)
    similarity = unit @ unit.transpose(1, 2)  # (N, P, P)
    rows, cols = torch.triu_indices(vectors.shape[1], vectors.shape[1], offset=1, device=vectors.device)
    return similarity[:, rows, cols].mean()


def _spatial_windows(frames: torch.Tensor, hw: int, ww: int) -> torch.Tensor:
    """(B, C, F, H, W) with H % hw == W % ww == 0 -> (B, F, H/hw * W/ww, hw * ww, C)."""
    b, c, f, h, w = frames.shape
    x = frames.reshape(b, c, f, h // hw, hw, w // ww, ww)
    x = x.permute(0, 2, 3, 5, 4, 6, 1)  # (B, F, nh, nw, hw, ww, C)
    return x.reshape(b, f, (h // hw) * (w // ww), hw * ww, c)


def local_correlation(z: torch.Tensor, window: tuple[int, int, int] | list[int] = (2, 2, 2),
                      normalize: bool = True) -> dict[str, torch.Tensor | None]:
    """Local correlation of a latent (B, C, F, H, W), differentiable w.r.t. ``z``.

    Returns ``{"image_corr", "video_corr", "avg_corr"}`` as 0-dim tensors; ``video_corr`` is None when the latent has
    no spatio-temporal window after frame 0 (images, or F - 1 < tw). ``normalize=False`` skips the per-channel
    standardisation (for a latent that is already standardised).
    """
    if z.dim() != 5:
        raise ValueError(f"local_correlation: expected a latent (B, C, F, H, W), got shape {tuple(z.shape)}")
    tw, hw, ww = (int(s) for s in window)
    _, c, f, h, w = z.shape
    if h < hw or w < ww:
        raise ValueError(f"local_correlation: latent {h}x{w} is smaller than one {hw}x{ww} spatial window")
    if c < 2:
        raise ValueError("local_correlation: needs at least 2 channels (each vector is centred over its channels)")
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()  # cosine similarities and channel statistics are too coarse in half precision
    if normalize:
        z = normalize_channels(z)
    # Leave out trailing rows/columns that do not fill a whole window (see the module docstring).
    z = z[:, :, :, : h - h % hw, : w - w % ww]
    windows = _spatial_windows(z, hw, ww)  # (B, F, n_spatial, hw * ww, C)
    b, _, n_spatial, n_positions, _ = windows.shape

    image_corr = mean_pairwise_cosine(windows[:, 0].reshape(-1, n_positions, c))
    video_frames = (f - 1) - (f - 1) % tw
    if video_frames == 0:
        return {"image_corr": image_corr, "video_corr": None, "avg_corr": image_corr}

    video = windows[:, 1 : 1 + video_frames]  # (B, F', n_spatial, P, C)
    video = video.reshape(b, video_frames // tw, tw, n_spatial, n_positions, c).permute(0, 1, 3, 2, 4, 5)
    video_corr = mean_pairwise_cosine(video.reshape(-1, tw * n_positions, c))
    return {"image_corr": image_corr, "video_corr": video_corr, "avg_corr": (image_corr + video_corr) / 2}


def lcr_penalty(avg_corr: torch.Tensor, thresh: float) -> torch.Tensor:
    """Hinge: zero once the average local correlation reaches ``thresh``."""
    return F.relu(thresh - avg_corr)


def weighted_lcr(penalty: torch.Tensor, factor: torch.Tensor | float, config: LCRConfig) -> torch.Tensor:
    """The LCR term added to the loss: 0.1 * weight * adaptive factor * penalty (the released loss's scaling)."""
    return LCR_WEIGHT_SCALE * config.weight * factor * penalty


def lcr_loss(avg_corr: torch.Tensor, nll: torch.Tensor, encoder_last_layer: torch.Tensor,
             config: LCRConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted LCR term and its adaptive factor (both 0-dim tensors; the factor is detached).

    term = 0.1 * weight * factor * relu(thresh - avg_corr), factor = ||grad nll|| / (||grad penalty|| + 1e-4) w.r.t.
    the encoder's last conv weight, clamped to [0, max_adaptive_weight]. When the penalty is already zero the
    factor is reported as 0, and not computed (it would divide by a zero gradient) unless every rank must run the
    same autograd passes (ZeRO-3 on several ranks, ``infra.zero3.side_passes_are_collective``): the term is then
    0 times a clamped factor, still 0 with a zero gradient.
    """
    penalty = lcr_penalty(avg_corr, config.thresh)
    active = bool(penalty.detach() > 0)
    if not active and not side_passes_are_collective():
        return penalty * 0.0, torch.zeros((), device=penalty.device)
    factor = adaptive_weight(nll, penalty, encoder_last_layer, config.max_adaptive_weight, aux_name="LCR")
    if not active:
        factor = torch.zeros_like(factor)
    return weighted_lcr(penalty, factor, config), factor
