"""Sampling with classifier-free guidance, through diffusers' CogVideoX schedulers.

The schedulers (``CogVideoXDDIMScheduler``: deterministic DDIM; ``CogVideoXDPMScheduler``: CogVideoX's
stochastic DPM-Solver++(2M), the SAT default) are built from our ``DiffusionConfig`` so their noise levels
are those the model was trained on; this module only runs the loop and the guidance.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .diffusion import DenoiserFn, DiffusionConfig

SAMPLERS = ("ddim", "dpm++")


def make_scheduler(sampler: str, config: DiffusionConfig | None = None):
    """A diffusers CogVideoX scheduler for our schedule: v-prediction, trailing timestep spacing."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    config = (config or DiffusionConfig()).validate()
    classes = {"ddim": CogVideoXDDIMScheduler, "dpm++": CogVideoXDPMScheduler}
    if sampler not in classes:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return classes[sampler](
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=config.rescale_zero_terminal_snr,
        snr_shift_scale=config.snr_shift_scale,
    )


def dynamic_guidance_scale(guidance: float, step_index: int, num_steps: int) -> float:
    """CogVideoX's ramped guidance (SAT ``DynamicCFG``, exponent 5): 1 at the first step rising towards
    1 + guidance at the last, 1 + g * (1 - cos(pi * (i / n)^5)) / 2. In the form
    1 + g * (1 - cos(pi * ((T - t) / T)^5)) / 2, t counts the steps left and T = n.

    (diffusers' pipeline plugs the timestep value, up to 999, in place of the step count here; that is not
    what SAT does and is not followed.)"""
    return 1.0 + guidance * (1.0 - math.cos(math.pi * (step_index / num_steps) ** 5.0)) / 2.0


@torch.no_grad()
def sample(model: DenoiserFn, text_states: torch.Tensor, neg_states: torch.Tensor | None = None,
           shape: Sequence[int] | None = None, steps: int = 50, guidance: float = 6.0, dynamic_cfg: bool = False,
           sampler: str = "ddim", generator: torch.Generator | None = None, diffusion: DiffusionConfig | None = None,
           text_mask: torch.Tensor | None = None, neg_mask: torch.Tensor | None = None,
           latents: torch.Tensor | None = None) -> torch.Tensor:
    """Denoises Gaussian noise of ``shape`` (the model's latent layout, (B, F, C, H, W) for ours) into
    float32 latents.

    model(x, text_states, timestep[, text_mask]) predicts v. Guidance mixes an unconditional prediction made
    with neg_states (zeros when None, the embeddings CogVideoX dropped captions to during training):
    v = v_uncond + g (v_cond - v_uncond); with guidance 1 and no dynamic ramp only the conditional branch
    runs. ``latents`` replaces the initial noise.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    scheduler = make_scheduler(sampler, diffusion)
    device = text_states.device
    if latents is None:
        if shape is None:
            raise ValueError("sample needs shape or latents")
        noise_device = generator.device if generator is not None else device
        latents = torch.randn(tuple(shape), generator=generator, device=noise_device, dtype=torch.float32).to(device)
    latents = latents.float() * scheduler.init_noise_sigma
    if latents.shape[0] != text_states.shape[0]:
        raise ValueError(f"batch of latents {latents.shape[0]} != batch of text_states {text_states.shape[0]}")

    use_cfg = dynamic_cfg or guidance != 1.0
    if use_cfg:
        if neg_states is None:
            neg_states = torch.zeros_like(text_states)
        cond_states = torch.cat([neg_states, text_states])
        if text_mask is not None or neg_mask is not None:
            ones = torch.ones(text_states.shape[:2], dtype=torch.bool, device=device)
            cond_mask = torch.cat([ones if neg_mask is None else neg_mask, ones if text_mask is None else text_mask])
        else:
            cond_mask = None
    else:
        cond_states, cond_mask = text_states, text_mask

    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    old_x0 = None  # DPM-Solver++(2M) history
    for i, t in enumerate(timesteps):
        x = torch.cat([latents, latents]) if use_cfg else latents
        t_batch = t.expand(x.shape[0])
        kwargs = {} if cond_mask is None else {"text_mask": cond_mask}
        v = model(x.to(text_states.dtype), cond_states, t_batch, **kwargs).float()
        if use_cfg:
            scale = dynamic_guidance_scale(guidance, i, steps) if dynamic_cfg else guidance
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + scale * (v_cond - v_uncond)
        if sampler == "ddim":
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
        else:
            latents, old_x0 = scheduler.step(
                v, old_x0, t, timesteps[i - 1] if i > 0 else None, latents, generator=generator, return_dict=False
            )
    return latents.float()
