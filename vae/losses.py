"""SSVAE's training loss: reconstruction NLL with a learned variance, KL, LCR, and an adaptive hinge-GAN term.

SPEC-ssvae.md ("Losses and optimisation"), per generator step:
    rec   = l1_weight * |x - x_rec| + perceptual_weight * LPIPS_vgg(x_t, x_rec_t)   (LPIPS per frame, broadcast
            over that frame's pixels and channels, as the reference adds its (B, 1, T, 1, 1) map to the L1 map)
    nll   = sum(rec / exp(s) + s) / B                 (s = ``logvar``, a learned scalar initialised to 0)
    total = nll + kl_weight * KL + gan_weight * (-mean D(x_rec)) + LCR term
where gan_weight = disc_weight * clamp(||d nll/dW_dec|| / (||d gan/dW_dec|| + 1e-4), 0, 1e4) from step
``disc_start`` on (0 before), W_dec the decoder's last conv weight; the LCR term is in ``vae.lcr``. The discriminator
is trained with the hinge loss on its own steps; once it starts, generator and discriminator steps alternate.

Evaluation (module in eval mode, or grad disabled) reports the same terms with both adaptive factors set to 1, since
they need gradients.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from vae.adaptive_weight import adaptive_weight
from vae.discriminator import (DiscriminatorConfig, ImageVideoDiscriminator, hinge_discriminator_loss,
                               hinge_generator_loss)
from vae.lcr import LCRConfig, lcr_loss, lcr_penalty, local_correlation, weighted_lcr
from vae.lmr import LMRConfig, apply_lmr


@dataclass
class SSVAELossConfig:
    """Stage 1 of the released recipe by default; stage 2: ``disc_start=0``, ``lcr.enabled=False``, 512p LMR."""

    l1_weight: float = 1.0
    perceptual_weight: float = 1.0  # LPIPS (VGG) per frame; needs a perceptual network when > 0
    kl_weight: float = 5e-4
    logvar_init: float = 0.0
    learn_logvar: bool = True
    disc_weight: float = 1.0  # 0 disables the adversarial term and builds no discriminator
    disc_start: int = 25001
    disc_max_adaptive_weight: float = 1e4
    lcr: LCRConfig = field(default_factory=LCRConfig)
    lmr: LMRConfig = field(default_factory=LMRConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def validate(self, prefix: str = "loss") -> None:
        for key in ("l1_weight", "perceptual_weight", "kl_weight", "disc_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"{prefix}.{key}: must be >= 0, got {getattr(self, key)}")
        if self.l1_weight == 0 and self.perceptual_weight == 0:
            raise ValueError(f"{prefix}.l1_weight/perceptual_weight: at least one reconstruction term must be > 0")
        if self.disc_start < 0:
            raise ValueError(f"{prefix}.disc_start: must be >= 0, got {self.disc_start}")
        if self.disc_max_adaptive_weight <= 0:
            raise ValueError(f"{prefix}.disc_max_adaptive_weight: must be > 0, got {self.disc_max_adaptive_weight}")
        self.lcr.validate(f"{prefix}.lcr")
        self.lmr.validate(f"{prefix}.lmr")
        self.discriminator.validate(f"{prefix}.discriminator")


@contextmanager
def _no_param_grads(module: nn.Module) -> Iterator[None]:
    """Run ``module`` without recording gradients for its parameters (inputs still get theirs): the generator step
    must not leave gradients in the discriminator."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _check_pair(inputs: torch.Tensor, reconstructions: torch.Tensor) -> None:
    if inputs.dim() != 5 or inputs.shape != reconstructions.shape:
        raise ValueError(f"SSVAELoss: inputs and reconstructions must both be (B, C, T, H, W) of one shape, got "
                         f"{tuple(inputs.shape)} and {tuple(reconstructions.shape)}")


class SSVAELoss(nn.Module):
    """Owns the learned log-variance ``logvar`` and the discriminator; the trainer owns the optimizers.

    ``perceptual`` is an injected frozen network mapping two (N, 3, H, W) batches in [-1, 1] to (N, 1, 1, 1)
    distances (``infra.metrics.lpips.LPIPS(net="vgg")`` in training); it is kept in eval mode and frozen.
    """

    def __init__(self, config: SSVAELossConfig | None = None, perceptual: nn.Module | None = None):
        super().__init__()
        self.config = config or SSVAELossConfig()
        self.config.validate()
        if self.config.perceptual_weight > 0 and perceptual is None:
            raise ValueError(f"loss.perceptual_weight is {self.config.perceptual_weight} but no perceptual network "
                             f"was given: pass perceptual=LPIPS(net='vgg') or set loss.perceptual_weight to 0")
        self.perceptual = perceptual
        if perceptual is not None:
            perceptual.requires_grad_(False).eval()
        self.logvar = nn.Parameter(torch.full((), float(self.config.logvar_init)),
                                   requires_grad=self.config.learn_logvar)
        self.discriminator = (ImageVideoDiscriminator(self.config.discriminator)
                              if self.config.disc_weight > 0 else None)

    def train(self, mode: bool = True) -> "SSVAELoss":
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()  # a loss network: no dropout, fixed statistics, in every mode
        return self

    # ------------------------------------------------------------------------------------------------ schedule

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """Parameters trained with the autoencoder's optimizer (the learned log-variance)."""
        return [self.logvar] if self.logvar.requires_grad else []

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return [] if self.discriminator is None else list(self.discriminator.parameters())

    def gan_active(self, step: int) -> bool:
        """Whether the adversarial term is on at this step (generator side) and the discriminator trains."""
        return self.discriminator is not None and step >= self.config.disc_start

    def is_discriminator_step(self, step: int) -> bool:
        """Discriminator steps: disc_start, disc_start + 2, ...; every other step (and every step before
        disc_start) is a generator step. So the discriminator takes the first step at disc_start, before the
        generator is judged by it, and the two alternate from then on."""
        return self.gan_active(step) and (step - self.config.disc_start) % 2 == 0

    def apply_lmr(self, z: torch.Tensor, mask_token: torch.Tensor, resolution: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
        """LMR on a sampled latent of frames ``resolution`` pixels high, with this loss's LMR config; masks only in
        training mode (see ``vae.lmr``)."""
        return apply_lmr(z, mask_token, self.config.lmr, self.training, resolution, generator)

    # ------------------------------------------------------------------------------------------- generator terms

    def perceptual_distance(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """Per-frame perceptual distance (B, 1, T, 1, 1)."""
        b, c, t, h, w = inputs.shape
        weight = next(self.perceptual.parameters(), None)
        dtype = inputs.dtype if weight is None else weight.dtype  # e.g. bf16 video, fp32 LPIPS
        frames = [x.transpose(1, 2).reshape(b * t, c, h, w).to(dtype) for x in (inputs, reconstructions)]
        distance = self.perceptual(*frames)
        if distance.numel() != b * t:
            raise ValueError(f"perceptual network must return one distance per frame ({b * t}), got shape "
                             f"{tuple(distance.shape)}")
        return distance.reshape(b, 1, t, 1, 1)

    def reconstruction_terms(self, inputs: torch.Tensor,
                             reconstructions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-element rec (B, C, T, H, W), L1 map, perceptual (B, 1, T, 1, 1) or a 0-dim zero), in float32:
        the NLL sums millions of elements, which half precision cannot do accurately."""
        l1 = (inputs.float() - reconstructions.float()).abs()
        rec = self.config.l1_weight * l1
        perceptual = torch.zeros((), device=inputs.device)
        if self.config.perceptual_weight > 0:
            perceptual = self.perceptual_distance(inputs, reconstructions).float()
            rec = rec + self.config.perceptual_weight * perceptual
        return rec, l1, perceptual

    def nll(self, rec: torch.Tensor) -> torch.Tensor:
        """sum(rec / exp(s) + s) over all elements, averaged over the batch."""
        logvar = self.logvar.float()
        return (rec / torch.exp(logvar) + logvar).sum() / rec.shape[0]

    def _gan_term(self, reconstructions: torch.Tensor, nll: torch.Tensor, step: int,
                  decoder_last_layer: torch.Tensor | None, adaptive: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(generator hinge loss, adaptive factor); both zero before disc_start."""
        zero = torch.zeros((), device=reconstructions.device)
        if not self.gan_active(step):
            return zero, zero
        with _no_param_grads(self.discriminator):
            gan = hinge_generator_loss(self.discriminator(reconstructions)).float()
        if not adaptive:
            return gan, torch.ones_like(zero)
        factor = adaptive_weight(nll, gan, decoder_last_layer, self.config.disc_max_adaptive_weight,
                                 aux_name="GAN generator")
        return gan, factor

    def _lcr_term(self, latent_mean: torch.Tensor, nll: torch.Tensor, encoder_last_layer: torch.Tensor | None,
                  adaptive: bool) -> tuple[dict[str, torch.Tensor | None], torch.Tensor, torch.Tensor]:
        """(local correlations, weighted LCR term, adaptive factor). The correlations are measured (without a
        graph) even when LCR is off, to monitor the latent's spectrum."""
        config = self.config.lcr
        with torch.set_grad_enabled(torch.is_grad_enabled() and config.enabled):
            corr = local_correlation(latent_mean, config.window)
        zero = torch.zeros((), device=latent_mean.device)
        if not config.enabled:
            return corr, zero, zero
        if adaptive:
            term, factor = lcr_loss(corr["avg_corr"], nll, encoder_last_layer, config)
            return corr, term, factor
        term = weighted_lcr(lcr_penalty(corr["avg_corr"], config.thresh), 1.0, config)
        return corr, term, torch.ones_like(zero)

    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posterior: Any, step: int,
                       encoder_last_layer: torch.Tensor | None = None,
                       decoder_last_layer: torch.Tensor | None = None,
                       latent_mean_for_lcr: torch.Tensor | None = None,
                       lmr_ratio: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Autoencoder loss and its logs.

        ``posterior`` needs ``.mean`` (B, C, F, H, W) and ``.kl()`` (per-sample sums, either already averaged over
        the batch as a 0-dim tensor or as a (B,) tensor). LCR is measured on ``latent_mean_for_lcr`` (default:
        ``posterior.mean``). ``encoder_last_layer`` is needed when LCR is on, ``decoder_last_layer`` once the GAN
        term is; both only in training (ValueError if missing or not reached by the losses). ``lmr_ratio`` is only
        logged.
        """
        _check_pair(inputs, reconstructions)
        adaptive = self.training and torch.is_grad_enabled()
        rec, l1, perceptual = self.reconstruction_terms(inputs, reconstructions)
        nll = self.nll(rec)

        kl = posterior.kl().float()
        kl = kl.mean() if kl.dim() > 0 else kl
        latent_mean = posterior.mean if latent_mean_for_lcr is None else latent_mean_for_lcr
        loss = nll + self.config.kl_weight * kl

        gan, gan_factor = self._gan_term(reconstructions, nll, step, decoder_last_layer, adaptive)
        loss = loss + self.config.disc_weight * gan_factor * gan
        corr, lcr_term, lcr_factor = self._lcr_term(latent_mean, nll, encoder_last_layer, adaptive)
        loss = loss + lcr_term

        logs = {
            "loss/total": loss, "loss/nll": nll, "loss/rec": rec.mean(), "loss/l1": l1.mean(),
            "loss/perceptual": perceptual.mean(), "loss/kl": kl, "loss/kl_per_element": kl / latent_mean[0].numel(),
            "loss/gan_generator": gan, "loss/lcr": lcr_term, "scalars/logvar": self.logvar,
            "scalars/gan_weight": self.config.disc_weight * gan_factor, "scalars/gan_adaptive_weight": gan_factor,
            "scalars/lcr_adaptive_weight": lcr_factor, "lcr/image_corr": corr["image_corr"],
            "lcr/avg_corr": corr["avg_corr"],
        }
        if corr["video_corr"] is not None:
            logs["lcr/video_corr"] = corr["video_corr"]
        logs = {key: float(value.detach()) for key, value in logs.items()}
        if lmr_ratio is not None:
            logs["lmr/mask_ratio"] = float(lmr_ratio)
        return loss, logs

    # ----------------------------------------------------------------------------------------- discriminator term

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, step: int,
                           discriminator: Callable | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss of the discriminator on real inputs vs detached reconstructions. Before ``disc_start`` it is a
        zero that backpropagates to nothing; with ``disc_weight`` 0 (no discriminator) it raises ValueError.
        ``discriminator``: what runs the discriminator, by default the module itself; a trainer passes its training
        engine, since DeepSpeed's ZeRO-3 counts gradient-accumulation micro-steps in the engine's forward (measured:
        calling the module directly with 2 accumulation steps gave a wrong update)."""
        if self.discriminator is None:
            raise ValueError("discriminator_loss: loss.disc_weight is 0, so there is no discriminator to train")
        _check_pair(inputs, reconstructions)
        if not self.gan_active(step):
            return torch.zeros((), device=inputs.device, requires_grad=True), {"loss/disc": 0.0}
        discriminator = discriminator or self.discriminator
        logits_real = discriminator(inputs.detach())
        logits_fake = discriminator(reconstructions.detach())
        loss = hinge_discriminator_loss(logits_real, logits_fake)
        logs = {"loss/disc": float(loss.detach())}
        for branch, real, fake in zip(("image", "video"), logits_real, logits_fake):
            logs[f"logits/real_{branch}"] = float(real.detach().mean())
            logs[f"logits/fake_{branch}"] = float(fake.detach().mean())
        return loss, logs
