"""LMR (Latent Masked Reconstruction): hide parts of the sampled latent from the decoder during training.

SPEC-ssvae.md ("LMR"): after sampling z and before decoding, draw a mask ratio (0 most of the time), cut the latent's
(T, H, W) grid into blocks, replace a random set of whole blocks by a learned mask token in all channels, and let the
decoder reconstruct the full video anyway. The mask ratio distribution and block size depend on the training
resolution (the height of the input frames, in pixels: 256 or 512 in the released recipe), which the caller passes,
so the settings do not depend on the model's compression. The same positions are masked in every sample of the
batch. Evaluation never masks.

Two shape rules, decided here:
- Blocks tile the grid from the origin; trailing frames/rows/columns that do not fill a whole block are never
  masked (as in the reference implementation: with 2x2x2 blocks a 5-frame latent's last frame stays visible).
- A block larger than the latent along an axis is clipped to the latent's extent there, so a 512p image (T = 1) is
  masked with 1x2x2 blocks (the reference would silently mask nothing).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LMRConfig:
    """Mask-ratio distribution and block size per training resolution (the input frames' height in pixels)."""

    enabled: bool = True
    mask_ratios: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])
    mask_probs: dict[int, list[float]] = field(
        default_factory=lambda: {256: [0.7, 0.1, 0.1, 0.1], 512: [0.6, 0.1, 0.15, 0.15]})
    block_sizes: dict[int, list[int]] = field(default_factory=lambda: {256: [1, 1, 1], 512: [2, 2, 2]})
    # Standard deviation of the mask token of a model trained from scratch; None keeps the released init (a standard
    # normal). The released latents have per-channel std ~1.2, so there the token starts on their scale; a small VAE
    # early in training has latents of std ~0.2 and a token that Adam moves by ~lr per step, so a standard-normal
    # token stays 4-5x larger than anything the encoder makes for the whole of a short run (docs/STUDY.md, "the
    # smallest changes that make LCR act"). Only for a model built from scratch, with LMR on (the training config
    # checks both).
    token_init_std: float | None = None

    def validate(self, prefix: str = "lmr") -> None:
        if self.token_init_std is not None and not self.token_init_std >= 0:
            raise ValueError(f"{prefix}.token_init_std: must be >= 0 (or null for the released init), "
                             f"got {self.token_init_std}")
        if not self.mask_ratios or any(not 0.0 <= r < 1.0 for r in self.mask_ratios):
            raise ValueError(f"{prefix}.mask_ratios: must be a non-empty list of values in [0, 1), "
                             f"got {list(self.mask_ratios)}")
        for resolution, probs in self.mask_probs.items():
            if len(probs) != len(self.mask_ratios) or any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
                raise ValueError(f"{prefix}.mask_probs.{resolution}: must be {len(self.mask_ratios)} non-negative "
                                 f"probabilities (one per mask ratio) summing to 1, got {list(probs)}")
        for resolution, block in self.block_sizes.items():
            if len(block) != 3 or any(int(s) < 1 for s in block):
                raise ValueError(f"{prefix}.block_sizes.{resolution}: must be three positive sizes (t, h, w), "
                                 f"got {list(block)}")
        if set(self.mask_probs) != set(self.block_sizes):
            raise ValueError(f"{prefix}.mask_probs/block_sizes: must name the same resolutions, got "
                             f"{sorted(self.mask_probs)} and {sorted(self.block_sizes)}")

    def settings_for(self, resolution: int) -> tuple[list[float], list[int]]:
        """(mask probabilities, block size) at a training resolution (pixels); ValueError for an unconfigured one."""
        if resolution not in self.mask_probs or resolution not in self.block_sizes:
            raise ValueError(f"lmr.mask_probs/lmr.block_sizes: no entry for training resolution {resolution} (the "
                             f"frames' height in pixels); configured: {sorted(self.mask_probs)}")
        return list(self.mask_probs[resolution]), [int(s) for s in self.block_sizes[resolution]]


def sample_mask_ratio(ratios: list[float], probs: list[float], generator: torch.Generator | None = None) -> float:
    """Draw one mask ratio with the given probabilities."""
    index = torch.multinomial(torch.tensor(probs, dtype=torch.float64), 1, generator=generator).item()
    return float(ratios[index])


def block_mask(size: tuple[int, int, int], ratio: float, block: list[int] | tuple[int, int, int],
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean (T, H, W) mask of max(1, floor(T*H*W*ratio / block_volume)) whole blocks chosen uniformly without
    replacement (at most all blocks); all False for ratio 0. Built on the CPU so a CPU generator drives it."""
    t, h, w = size
    mask = torch.zeros(t, h, w, dtype=torch.bool)
    if ratio <= 0:
        return mask
    bt, bh, bw = min(block[0], t), min(block[1], h), min(block[2], w)
    nt, nh, nw = t // bt, h // bh, w // bw
    num_blocks = nt * nh * nw
    num_masked = min(num_blocks, max(1, int(t * h * w * ratio // (bt * bh * bw))))
    chosen = torch.randperm(num_blocks, generator=generator)[:num_masked]
    grid = torch.zeros(num_blocks, dtype=torch.bool)
    grid[chosen] = True
    # Expand each block flag to its bt x bh x bw positions.
    grid = grid.reshape(nt, 1, nh, 1, nw, 1).expand(nt, bt, nh, bh, nw, bw).reshape(nt * bt, nh * bh, nw * bw)
    mask[: nt * bt, : nh * bh, : nw * bw] = grid
    return mask


def apply_lmr(z: torch.Tensor, mask_token: torch.Tensor, config: LMRConfig, training: bool, resolution: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """Mask a sampled latent (B, C, T, H, W) of frames ``resolution`` pixels high with ``mask_token`` (1, C, 1, 1, 1);
    returns (latent, ratio used).

    Identity (ratio 0.0) when not ``training`` or when LMR is disabled. Gradients reach ``mask_token`` through the
    masked positions and ``z`` through the others. Deterministic given ``generator`` (a CPU torch.Generator).

    In training the token is part of the graph even at ratio 0 (an all-False mask: its gradient is zero), so every
    rank of a data-parallel run reduces the same parameters whatever ratio each drew; a token missing from one
    rank's backward made DeepSpeed's ZeRO reductions mismatch (gloo: "Received data size doesn't match").
    """
    if not training or not config.enabled:
        return z, 0.0
    if z.dim() != 5:
        raise ValueError(f"apply_lmr: expected a latent (B, C, T, H, W), got shape {tuple(z.shape)}")
    if tuple(mask_token.shape) != (1, z.shape[1], 1, 1, 1):
        raise ValueError(f"apply_lmr: mask_token must have shape (1, {z.shape[1]}, 1, 1, 1), "
                         f"got {tuple(mask_token.shape)}")
    probs, block = config.settings_for(resolution)
    ratio = sample_mask_ratio(config.mask_ratios, probs, generator)
    mask = block_mask(tuple(z.shape[2:]), ratio, block, generator).to(z.device)
    return torch.where(mask[None, None], mask_token.to(z.dtype), z), ratio
