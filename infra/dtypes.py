"""The names configs give torch dtypes: one map for the whole stack."""
from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, key: str = "dtype", allowed: tuple[str, ...] = tuple(DTYPES)) -> torch.dtype:
    """The dtype called ``name``; ValueError naming ``key`` and the choices when it is not one of ``allowed``."""
    if name not in allowed:
        raise ValueError(f"{key}: must be one of {list(allowed)}, got {name!r}")
    return DTYPES[name]
