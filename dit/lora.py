"""LoRA fine-tuning of the DiT through peft.

``lora.enabled`` turns a ``dit.train`` run into an adapter training: the DiT's weights come from ``lora.base`` (a
diffusers transformer folder, e.g. a finished run's ``dit/`` export) and are frozen, and peft adds rank-``rank``
adapters to the Linear layers named by ``target_modules`` (matched against module names as peft does: a name equal
to an entry or ending in ``.<entry>``). Only the adapters train, on the same DeepSpeed engine (it hands the optimizer
the parameters that require grad, and the EMA keeps those), so checkpoints and exact resume are unchanged.

At the end of training the run exports

- ``lora/pytorch_lora_weights.safetensors``: the adapter in diffusers' LoRA format (written by diffusers' own
  ``CogVideoXLoraLoaderMixin.save_lora_weights``, with the peft config as metadata), which
  ``CogVideoXPipeline.load_lora_weights`` or ``CogVideoXTransformer3DModel.load_lora_adapter(..., prefix="transformer")``
  applies;
- ``dit/``: the base with the adapter merged in, so every tool that samples a run works unchanged.

Our module names equal diffusers' CogVideoXTransformer3DModel's for every Linear, except the patch projection, which
is a convolution there: it cannot carry an adapter that diffusers could load, so it is refused as a target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from infra.config import ConfigError, check, join_key

LORA_DIR = "lora"  # <output_dir>/lora: the adapter in diffusers' LoRA format
ADAPTER = "default"  # peft's adapter name
NOT_TARGETABLE = ("patch_embed.proj",)  # a Conv in diffusers' model


@dataclass
class LoraConfig:
    """The ``lora:`` section of a DiT run."""

    enabled: bool = False
    base: str = ""  # diffusers transformer folder whose weights are frozen and adapted
    rank: int = 16
    alpha: float = 16.0  # adapter scale alpha / rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def validate(self, prefix: str = "lora") -> None:
        if not self.enabled:
            return
        check(bool(self.base), join_key(prefix, "base"),
              "is required with lora.enabled (the diffusers transformer folder to adapt, e.g. a run's dit/)")
        check(not self.base or (Path(self.base) / "config.json").is_file(), join_key(prefix, "base"),
              f"{self.base} is not a diffusers transformer folder (no config.json)")
        check(self.rank >= 1, join_key(prefix, "rank"), f"must be >= 1, got {self.rank}")
        check(self.alpha > 0, join_key(prefix, "alpha"), f"must be > 0, got {self.alpha}")
        check(0.0 <= self.dropout < 1.0, join_key(prefix, "dropout"), f"must be in [0, 1), got {self.dropout}")
        targets = list(self.target_modules)
        check(bool(targets), join_key(prefix, "target_modules"), "must name at least one Linear layer")
        bad = [t for t in targets if any(n == t or n.endswith("." + t) for n in NOT_TARGETABLE)]
        check(not bad, join_key(prefix, "target_modules"),
              f"{bad}: the patch projection is a convolution in diffusers' model and cannot carry a loadable adapter")

    def peft_config(self):
        import peft

        return peft.LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                               target_modules=list(self.target_modules), init_lora_weights=True)


def load_base(model: nn.Module, cfg: LoraConfig) -> None:
    """Load the base weights of ``cfg.base`` into ``model`` (built from the run's config), naming what differs."""
    from .convert import from_diffusers

    base = from_diffusers(cfg.base)
    try:
        model.load_state_dict(base.state_dict(), strict=True)
    except RuntimeError as error:
        raise ConfigError(f"lora.base: {cfg.base} does not fit the DiT this run builds (model section, first stage "
                          f"and text encoder): {error}") from None


def add_adapters(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze ``model`` and inject peft LoRA adapters into its target Linear layers; returns the same module."""
    import peft

    model.requires_grad_(False)
    no_match = f"lora.target_modules: {list(cfg.target_modules)} match no Linear layer of the DiT"
    try:
        peft.inject_adapter_in_model(cfg.peft_config(), model, adapter_name=ADAPTER)
    except ValueError as error:  # peft's NoMatchingPeftModuleError, or a target that is not a Linear
        raise ConfigError(f"{no_match} ({error})") from None
    if not any(isinstance(module, peft.tuners.lora.LoraLayer) for module in model.modules()):
        raise ConfigError(no_match)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights, peft's names (``...to_q.lora_A.weight``), as diffusers' LoRA files hold them."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous()
            for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter merged into its base weight (W + scale * B @ A)."""
    import peft

    merged: dict[str, torch.Tensor] = {}
    lora_layers = {name: module for name, module in model.named_modules()
                   if isinstance(module, peft.tuners.lora.LoraLayer)}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        merged[key.replace(".base_layer.", ".")] = value.detach()
    with torch.no_grad():
        for name, layer in lora_layers.items():
            merged[f"{name}.weight"] = layer.base_layer.weight + layer.get_delta_weight(ADAPTER).to(
                layer.base_layer.weight.dtype)
    return merged


def export_adapter(model: nn.Module, cfg: LoraConfig, folder: str | Path) -> Path:
    """Write the adapter in diffusers' LoRA format (``pytorch_lora_weights.safetensors``) into ``folder``."""
    from diffusers.loaders.lora_pipeline import CogVideoXLoraLoaderMixin

    folder = Path(folder)
    metadata = cfg.peft_config().to_dict()
    CogVideoXLoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=adapter_state_dict(model),
                                               transformer_lora_adapter_metadata=metadata)
    return folder
