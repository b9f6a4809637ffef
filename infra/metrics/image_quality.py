"""PSNR and SSIM for images (N, C, H, W) or videos (N, C, T, H, W) in [-1, 1], frame by frame.

Both map [-1, 1] to [0, 1] first (data range 1), score every frame, and average the frames of each sample,
returning one value per sample (N,). SSIM is Wang et al. 2004 as in their MATLAB reference: 11x11 Gaussian
window (sigma 1.5), K1 = 0.01, K2 = 0.03, 'valid' filtering, averaged over channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_PSNR_DB = 100.0  # identical frames: cap instead of returning inf so averages stay finite


def _frames(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Both inputs as (N * T, C, H, W) in [0, 1], plus T (1 for images)."""
    if x.shape != y.shape:
        raise ValueError(f"inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() == 4:
        t = 1
    elif x.dim() == 5:
        t = x.shape[2]
        x, y = (v.transpose(1, 2).flatten(0, 1) for v in (x, y))
    else:
        raise ValueError(f"expected (N, C, H, W) or (N, C, T, H, W), got {tuple(x.shape)}")
    return (x.double() + 1) / 2, (y.double() + 1) / 2, t


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample (N,), frames averaged."""
    x, y, t = _frames(x, y)
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    db = (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-MAX_PSNR_DB / 10)))).clamp_max(MAX_PSNR_DB)
    return db.view(-1, t).mean(1).float()


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity per sample (N,), frames and channels averaged. Frames must be >= ``window``."""
    x, y, t = _frames(x, y)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs frames of at least {window}x{window}, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    g = _gaussian_window(window, sigma, x.dtype)
    # separable Gaussian, one filter per channel, 'valid' borders
    gh, gw = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(v, gh, groups=c), gw, groups=c)

    c1, c2 = k1 ** 2, k2 ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3)).view(-1, t).mean(1).float()
