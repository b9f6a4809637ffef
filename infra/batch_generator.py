"""The random generator of one batch: every random draw of a training step (noise, timesteps, caption drops, the VAE's
posterior sample and LMR mask) comes from a generator seeded by the run's seed and the batch's global index.

So the draws depend neither on the process's RNG history (a resumed run and a run on cached latents draw what an
uninterrupted on-the-fly run draws) nor on which rank holds the batch (a run on W ranks draws what the same global
batches draw on 1 rank with accumulation). ``stream`` keeps generators for different uses of one batch apart.
"""
from __future__ import annotations

import torch


def batch_generator(seed: int, batch_index: int, device: torch.device | str = "cpu",
                    stream: int = 0) -> torch.Generator:
    """The generator of global batch ``batch_index`` (``batch["step"]``) on ``device``."""
    # Stream 0 keeps the seeds of the earlier (seed, data position, rank) scheme for rank 0, i.e. of one-rank runs.
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + batch_index) * 1_009 + stream * 7_919_017)
