"""Whole parameters of a ZeRO-3 module, for the few places that need them outside its forward (export)."""
from __future__ import annotations

from contextlib import nullcontext

from torch import nn


def is_partitioned(module: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the module's parameters (each rank then holds a slice of each)."""
    return any(hasattr(p, "ds_tensor") for p in module.parameters())


def full_parameters(module: nn.Module):
    """A context in which a ZeRO-3 module's parameters are whole on every rank (collective: every rank of its group
    enters it); a no-op for any other module."""
    if not is_partitioned(module):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
