"""Predictors of diffusability that need no diffusion training: the velocity irreducible variance (VIV).

"Diffusing in the Right Space" (arXiv 2606.03578) measures how ambiguous the diffusion target is in a latent space:
where noised trajectories of different data points cross, the model cannot know which one it is on, and the part of
the velocity target it cannot predict is irreducible. For v-prediction (``dit.diffusion``: x_t = a x0 + s eps,
v = a eps - s x0 = (a x_t - x0) / s) that part is

    Var(v | x_t) = Var(x0 | x_t) / s^2,

and over an empirical set of latents {x0_i} the posterior is p(i | x_t) ~ exp(-|x_t - a x0_i|^2 / (2 s^2)). This module
estimates it with a *reference* set (the DiT's training latents) and *queries* noised from other latents of the same
distribution, so that at low noise the posterior does not collapse onto the query itself: VIV(t) is the mean over
queries of Var(v | x_t) per element, divided by E|v|^2 per element; ``viv`` is its mean over the training timesteps
(uniform, as the DiT samples them). 0: the target is always predictable; 1 (at pure noise): not at all.

The latents are taken as the DiT sees them (normalised, after any latent transform), flattened per sample.
An orthogonal transform (the checkerboard control) leaves VIV unchanged; whitening does not.
"""
from __future__ import annotations

import math

import torch

from dit.diffusion import DiffusionConfig, VPrediction


@torch.no_grad()
def velocity_irreducible_variance(latents: torch.Tensor, diffusion: DiffusionConfig | None = None,
                                  num_timesteps: int = 16, num_queries: int = 64, max_reference: int = 512,
                                  seed: int = 0) -> dict:
    """VIV of ``latents`` (N, ...) under ``diffusion``'s schedule; see the module docstring.

    The last ``num_queries`` samples (at most a quarter of N) are the queries, up to ``max_reference`` of the others
    the reference set (the cost grows with queries x reference x dimensions x timesteps). Returns
    ``{"viv", "per_timestep": [[t, viv_t], ...], "reference", "queries"}``.
    """
    if latents.dim() < 2 or latents.shape[0] < 8:
        raise ValueError(f"VIV needs at least 8 latents (N, ...), got shape {tuple(latents.shape)}")
    if num_timesteps < 1 or num_queries < 1:
        raise ValueError("num_timesteps and num_queries must be >= 1")
    # float64 throughout: the posterior variance is a small difference of large sums, divided by s^2.
    x = latents.detach().reshape(latents.shape[0], -1).to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("latents hold NaN or infinite values")
    q = min(num_queries, x.shape[0] // 4)
    reference, queries = x[:-q][:max_reference], x[-q:]
    process = VPrediction(diffusion or DiffusionConfig())
    abar = process.alphas_cumprod
    steps = torch.linspace(0, process.num_train_timesteps - 1, num_timesteps).round().long()
    g = torch.Generator().manual_seed(seed)
    ref_sq = (reference ** 2).sum(1)  # (R,)
    dim = x.shape[1]
    per_t = []
    for t in steps.tolist():
        a, s = math.sqrt(float(abar[t])), math.sqrt(float(1 - abar[t]))
        noise = torch.randn(queries.shape, generator=g, dtype=torch.float64)
        xt = a * queries + s * noise
        v = a * noise - s * queries
        if s < 1e-8:
            per_t.append([t, 0.0])
            continue
        # log p(i | x_t) up to a constant: -(|x_t|^2 - 2 a x_t.x0_i + a^2 |x0_i|^2) / (2 s^2)
        logits = (2 * a * xt @ reference.T - a * a * ref_sq[None]) / (2 * s * s)
        w = torch.softmax(logits, dim=1)  # (Q, R)
        mean = w @ reference  # E[x0 | x_t]
        var = (w @ ref_sq) - (mean ** 2).sum(1)  # tr Var(x0 | x_t) = E|x0|^2 - |E x0|^2
        per_element = var.clamp_min(0).mean() / (s * s) / dim
        per_t.append([t, float(per_element / (v ** 2).mean())])
    return {"viv": sum(v for _, v in per_t) / len(per_t), "per_timestep": per_t, "reference": reference.shape[0],
            "queries": q}
