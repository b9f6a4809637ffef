"""Reading DeepSpeed's checkpoint files without unpickling code: every ``torch.load`` weights-only.

DeepSpeed reads its files with ``torch.load(weights_only=False)`` (its engine, ``zero_to_fp32``, ``ds_to_universal``),
so a crafted checkpoint would run code for whoever loads it. These context managers force ``weights_only=True`` and
admit only the plain-data classes DeepSpeed stores (``deepspeed_safe_globals``).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def weights_only_loading():
    """Make DeepSpeed read its checkpoint files with ``torch.load(weights_only=True)`` (it defaults to False)."""
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine as tce

    original = tce.TorchCheckpointEngine.load

    def load(self, path, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)

    tce.TorchCheckpointEngine.load = load
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        tce.TorchCheckpointEngine.load = original


def deepspeed_safe_globals() -> list:
    """Plain-data classes that DeepSpeed puts in its checkpoints (enums and config containers, no code)."""
    allowed = []
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:
        pass
    return allowed


@contextmanager
def weights_only_torch_load():
    """Every ``torch.load`` inside reads weights only (DeepSpeed's consolidation and conversion code asks for full
    unpickling)."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original
