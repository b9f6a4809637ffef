"""Joint text-video self-attention.

The module does everything that is per token (projections, QK LayerNorm, rotary embedding of the video
tokens, output projection) and hands (B, heads, S, head_dim) q, k, v to a replaceable ``attention_fn``.
That function is the only place where tokens meet, so a sequence-parallel wrapper (DeepSpeed-Ulysses:
all-to-all from sequence shards to head shards and back) is applied by swapping it, with
``set_attention_fn(model, wrapper(model_fn))``, without touching model code.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import apply_rope


class AttentionFn(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """q, k, v: (B, heads, S, D); key_mask: (B, S) bool, True = attend, or None. Returns (B, heads, S, D)."""


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    if key_mask is not None:
        raise ValueError("attention_backend='flash' does not support a text mask; use 'sdpa' or pass no text_mask")
    flash_attn_func = _import_flash_attn()
    # flash-attn wants (B, S, heads, D) in fp16/bf16.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _import_flash_attn():
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise ImportError(
            "attention_backend='flash' needs the flash-attn package (a CUDA build); it is not installed. "
            "Install it on a GPU machine or use attention_backend='sdpa'."
        ) from err
    return flash_attn_func


def get_attention_fn(backend: str) -> AttentionFn:
    if backend == "sdpa":
        return sdpa_attention
    if backend == "flash":
        _import_flash_attn()  # fail when the model is built, not at the first step
        return flash_attention
    raise ValueError(f"attention_backend must be 'sdpa' or 'flash', got {backend!r}")


class Attention(nn.Module):
    """Self-attention over [text tokens, video tokens]; parameter names as diffusers' ``Attention``."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool, qk_norm: bool, dropout: float,
                 attention_fn: AttentionFn):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        # QK LayerNorm per head: keeps attention logits bounded in bf16 at this width.
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else None
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])
        self.attention_fn = attention_fn

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, video: torch.Tensor, text: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        text_len = text.shape[1]
        x = torch.cat([text, video], dim=1)
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(x)), self._heads(self.to_v(x))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            # Only the video tokens carry 3D positions; text tokens are not rotated.
            cos, sin = rope
            q = torch.cat([q[:, :, :text_len], apply_rope(q[:, :, text_len:], cos, sin)], dim=2)
            k = torch.cat([k[:, :, :text_len], apply_rope(k[:, :, text_len:], cos, sin)], dim=2)
        out = self.attention_fn(q, k, v, key_mask)
        out = out.transpose(1, 2).flatten(2)
        for layer in self.to_out:
            out = layer(out)
        return out[:, text_len:], out[:, :text_len]


def set_attention_fn(model: nn.Module, wrap: Callable[[AttentionFn], AttentionFn]) -> None:
    """Replaces the core attention of every ``Attention`` in model by wrap(its current function)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.attention_fn = wrap(module.attention_fn)
