"""Learning-rate schedule of the SSVAE recipe: linear warm-up from a start rate, then cosine decay to a floor."""
from __future__ import annotations

import math

from infra.config import OptimizerConfig


def learning_rate(opt: OptimizerConfig, step: int) -> float:
    """Rate for optimizer step ``step`` (0-based)."""
    if opt.warmup_steps and step < opt.warmup_steps:
        return opt.warmup_start_lr + (opt.lr - opt.warmup_start_lr) * step / opt.warmup_steps
    if not opt.decay_steps:
        return opt.lr
    progress = min(1.0, (step - opt.warmup_steps) / opt.decay_steps)
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1.0 + math.cos(math.pi * progress))
