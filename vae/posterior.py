"""Diagonal Gaussian posterior over the latent, from the encoder's moments."""

from __future__ import annotations

from typing import Optional

import torch


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)); moments are (B, 2C, ...) = mean channels then log-variance channels."""

    def __init__(self, moments: torch.Tensor) -> None:
        if moments.ndim < 2 or moments.shape[1] % 2:
            raise ValueError(f"moments need an even channel count on dim 1, got shape {tuple(moments.shape)}")
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), summed over all latent elements and averaged over the batch (a scalar)."""
        per_element = 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar)
        return per_element.flatten(1).sum(dim=1).mean()
