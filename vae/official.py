"""Load the released SSVAE checkpoint (PyTorch Lightning .ckpt or .safetensors in its key format).

Our module names equal the released ones (`encoder.*`, `decoder.*`, `mask_token`), so conversion is only
selecting keys: training-only ones (`loss.*`, the discriminator and the learned log-variance; `model_ema.*`) are
dropped, anything else unexpected is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import load_file

from vae.config import SSVAEConfig
from vae.model import SSVAE

# Training-only state, and the test tensors the golden reference file stores beside its weights.
_DROPPED_PREFIXES = ("loss.", "model_ema.", "regularization.", "io.", "lcr.")
_KEPT_PREFIXES = ("encoder.", "decoder.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .ckpt (Lightning: under `state_dict`) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    blob = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(blob, Mapping) and "state_dict" in blob:
        blob = blob["state_dict"]
    if not isinstance(blob, Mapping):
        raise ValueError(f"{path} holds no state dict")
    return dict(blob)


def convert_official_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released key names -> ours: keep encoder/decoder/mask_token, drop training-only keys."""
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        if key.startswith(_KEPT_PREFIXES) or key == "mask_token":
            out[key] = value
        elif not key.startswith(_DROPPED_PREFIXES):
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"unexpected keys in SSVAE checkpoint: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    return out


def read_latent_stats(path: str | Path) -> tuple[list[float], list[float]]:
    """A JSON file {"mean": [...], "std": [...]} as shipped beside the released checkpoint's inference config."""
    data = json.loads(Path(path).read_text())
    return list(data["mean"]), list(data["std"])


def load_official(
    path_or_state_dict: str | Path | Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | SSVAEConfig,
    latent_stats: Optional[str | Path | tuple[list[float], list[float]]] = None,
) -> SSVAE:
    """Build an SSVAE from released weights.

    config: the released YAML's `{"encoder_config": {...}, "decoder_config": {...}}` (bare params or
    `{target, params}`), or an SSVAEConfig. latent_stats: optional JSON path or (mean, std) lists for encode()/decode().
    A checkpoint without a mask token keeps the randomly initialised one.
    """
    cfg = config if isinstance(config, SSVAEConfig) else SSVAEConfig.from_official(dict(config))
    state = read_state_dict(path_or_state_dict) if isinstance(path_or_state_dict, (str, Path)) else path_or_state_dict
    state = convert_official_state_dict(state)
    model = SSVAE(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in ("mask_token", "latent_mean", "latent_std")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing {missing[:10]}, unexpected {unexpected[:10]}")
    if latent_stats is not None:
        mean, std = read_latent_stats(latent_stats) if isinstance(latent_stats, (str, Path)) else latent_stats
        model.set_latent_stats(mean, std)
    return model
