"""The diffusion process CogVideoX trains with: discrete v-prediction.

Betas are "scaled linear" (linear in sqrt(beta)) from 0.00085 to 0.012 over 1000 steps; the cumulative
alphas are SNR-shifted, alpha_bar / (s + (1 - s) * alpha_bar) with s = snr_shift_scale (3.0 for 2B, 1.0 for
5B; s > 1 lowers the SNR of every step, which larger token counts need), and then rescaled so the last step
has zero SNR (pure noise, Lin et al. 2024). The order (shift, then rescale) is that of diffusers'
CogVideoXDDIMScheduler, which these numbers equal.

Training: x_t = sqrt(a) x0 + sqrt(1 - a) eps at a uniform integer t, and the model regresses
v = sqrt(a) eps - sqrt(1 - a) x0 with a plain MSE. (CogVideoX's SAT loss, weighted MSE on the implied x0
with weight 1/(1 - a), is algebraically this same loss.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from infra.config import check, join_key

# model(latents, text_states, timestep, text_mask=None) -> v, e.g. CogVideoXTransformer.
DenoiserFn = Callable[..., torch.Tensor]


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_shift_scale: float = 3.0
    rescale_zero_terminal_snr: bool = True

    def validate(self, prefix: str = "DiffusionConfig") -> "DiffusionConfig":
        """Returns itself, to chain; ``prefix``: the section's key in a run config (``diffusion.schedule``)."""
        check(self.num_train_timesteps >= 2, join_key(prefix, "num_train_timesteps"),
              f"must be >= 2, got {self.num_train_timesteps}")
        check(0 < self.beta_start < self.beta_end < 1, join_key(prefix, "beta_start/beta_end"),
              f"must satisfy 0 < beta_start < beta_end < 1, got {self.beta_start} / {self.beta_end}")
        check(self.snr_shift_scale > 0, join_key(prefix, "snr_shift_scale"),
              f"must be positive, got {self.snr_shift_scale}")
        return self

    @classmethod
    def for_model(cls, name: str) -> "DiffusionConfig":
        """The schedule a CogVideoX size was trained with: "cogvideox-2b" (shift 3) or "cogvideox-5b" (shift 1)."""
        shifts = {"cogvideox-2b": 3.0, "cogvideox-5b": 1.0}
        if name not in shifts:
            raise ValueError(f"unknown model {name!r} for DiffusionConfig.for_model; known: {sorted(shifts)}")
        return cls(snr_shift_scale=shifts[name])


def alphas_cumprod(config: DiffusionConfig) -> torch.Tensor:
    """(num_train_timesteps,) float64 cumulative alphas, after the SNR shift and the zero-SNR rescale."""
    config.validate()
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    s = config.snr_shift_scale
    abar = abar / (s + (1 - s) * abar)
    if config.rescale_zero_terminal_snr:
        # Shift sqrt(abar) so its last value is 0, then scale so its first value is unchanged.
        root = abar.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))
        abar = root**2
    return abar


class VPrediction:
    """Forward process and loss of discrete v-prediction diffusion for a given schedule."""

    def __init__(self, config: DiffusionConfig | None = None):
        self.config = (config or DiffusionConfig()).validate()
        self.alphas_cumprod = alphas_cumprod(self.config)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t), sqrt(1 - abar_t) shaped (B, 1, ..., 1) to broadcast against like (B, ...)."""
        abar = self.alphas_cumprod.to(like.device)[timesteps.to(like.device).long()]
        shape = (-1,) + (1,) * (like.ndim - 1)
        return abar.sqrt().to(like.dtype).reshape(shape), (1 - abar).sqrt().to(like.dtype).reshape(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(timesteps, x0)
        return a * x0 + s * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(timesteps, x0)
        return a * noise - s * x0

    def predict_x0(self, xt: torch.Tensor, v: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(timesteps, xt)
        return a * xt - s * v

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """Uniform integer timesteps in [0, num_train_timesteps)."""
        t = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator,
                          device=generator.device if generator is not None else device)
        return t.to(device)

    def training_loss(self, model: DenoiserFn, latents: torch.Tensor, text_states: torch.Tensor,
                      text_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error between model(x_t, text, t) and the true v, for clean latents (B, ...).

        timesteps and noise are drawn from generator unless given; the MSE is taken in float32.
        """
        b = latents.shape[0]
        if timesteps is None:
            timesteps = self.sample_timesteps(b, generator, latents.device)
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype,
                                device=generator.device if generator is not None else latents.device).to(latents.device)
        xt = self.add_noise(latents, noise, timesteps)
        target = self.velocity(latents, noise, timesteps)
        kwargs = {} if text_mask is None else {"text_mask": text_mask}
        prediction = model(xt, text_states, timesteps, **kwargs)
        return F.mse_loss(prediction.float(), target.float())


def training_loss(model: DenoiserFn, latents: torch.Tensor, text_states: torch.Tensor,
                  text_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  config: DiffusionConfig | None = None) -> torch.Tensor:
    """One-call form of ``VPrediction(config).training_loss``."""
    return VPrediction(config).training_loss(model, latents, text_states, text_mask, generator)


def drop_text(embeddings: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Classifier-free-guidance dropout: each sample's text embeddings (B, L, D) are zeroed with probability p.
    CogVideoX's SAT conditioner does exactly this (p = 0.1) and samples the unconditional branch with zero
    embeddings as well."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop_text: p must be in [0, 1], got {p}")
    draws = torch.rand(embeddings.shape[0], generator=generator,
                       device=generator.device if generator is not None else embeddings.device)
    keep = (draws >= p).to(embeddings.device, embeddings.dtype)
    return embeddings * keep.reshape(-1, *([1] * (embeddings.ndim - 1)))
