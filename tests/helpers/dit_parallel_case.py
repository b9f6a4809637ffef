"""The case both 2-process DiT parallelism tests check: a tiny dense model, an identical copy to parallelise, inputs."""
import torch

from dit import CogVideoXTransformer, DiTConfig


def dense_and_copy(positional_embedding: str):
    """(reference, copy) with the same weights; seeded, so every rank builds the same pair."""
    torch.manual_seed(0)
    config = DiTConfig.preset("tiny", positional_embedding=positional_embedding, patch_size=1)
    reference = CogVideoXTransformer(config)
    parallel = CogVideoXTransformer(config)
    parallel.load_state_dict(reference.state_dict())
    return reference, parallel


def inputs(use_mask: bool):
    """(latents, text, timestep, text_mask or None, regression target)."""
    latents, text = torch.randn(2, 2, 16, 4, 4), torch.randn(2, 8, 32)
    timestep = torch.tensor([3, 800])
    mask = None
    if use_mask:
        mask = torch.ones(2, 8, dtype=torch.bool)
        mask[0, 5:] = False
    return latents, text, timestep, mask, torch.randn_like(latents)
