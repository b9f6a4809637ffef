"""Per-channel statistics of latents (N, C, T, H, W), in one pass or accumulated over a data set.

The SSVAE inference normalisation needs each channel's mean and std over a data set (``encode`` returns
``(mean - m) / s``); the same numbers tell how Gaussian a latent space looks (excess kurtosis 0 for a Gaussian).
"""
from __future__ import annotations

import torch


class LatentMoments:
    """Running per-channel sums of x, x^2, x^3, x^4 (float64), min and max, over batches of latents."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: torch.Tensor | None = None  # (4, C)
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def update(self, latents: torch.Tensor) -> "LatentMoments":
        if latents.dim() != 5:
            raise ValueError(f"latents must be (N, C, T, H, W), got shape {tuple(latents.shape)}")
        x = latents.detach().to(torch.float64).transpose(0, 1).reshape(latents.shape[1], -1)  # (C, M)
        if self.sums is not None and x.shape[0] != self.sums.shape[1]:
            raise ValueError(f"latents have {x.shape[0]} channels, earlier batches had {self.sums.shape[1]}")
        sums = torch.stack([x.sum(1), (x**2).sum(1), (x**3).sum(1), (x**4).sum(1)])
        low, high = x.min(1).values, x.max(1).values
        if self.sums is None:
            self.sums, self.low, self.high = sums, low, high
        else:
            self.sums += sums
            self.low, self.high = torch.minimum(self.low, low), torch.maximum(self.high, high)
        self.count += x.shape[1]
        return self

    def result(self) -> dict:
        """Per channel: ``mean``, ``std`` (population), ``kurtosis`` (excess), ``min``, ``max``; plus overall values."""
        if self.sums is None:
            raise ValueError("no latents were added")
        n = self.count
        m1, m2, m3, m4 = (s / n for s in self.sums)
        var = (m2 - m1**2).clamp_min(0.0)
        # Central fourth moment from raw moments.
        c4 = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4
        kurtosis = c4 / var.clamp_min(1e-24) ** 2 - 3.0
        overall_mean = m1.mean()
        overall_var = (m2.mean() - overall_mean**2).clamp_min(0.0)
        return {
            "channels": int(m1.numel()),
            "count": n,
            "mean": m1.tolist(),
            "std": var.sqrt().tolist(),
            "kurtosis": kurtosis.tolist(),
            "min": self.low.tolist(),
            "max": self.high.tolist(),
            "overall_mean": float(overall_mean),
            "overall_std": float(overall_var.sqrt()),
            "mean_abs_channel_mean": float(m1.abs().mean()),
            "mean_kurtosis": float(kurtosis.mean()),
        }


def latent_statistics(latents: torch.Tensor) -> dict:
    """Per-channel and overall statistics of one tensor of latents (N, C, T, H, W); see ``LatentMoments.result``."""
    return LatentMoments().update(latents).result()
