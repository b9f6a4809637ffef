"""Exponential moving average of a model's trainable weights, kept in fp32 beside the DeepSpeed engine.

Under ZeRO-3 each rank keeps the average of its own partition of every parameter (``p.ds_tensor``), so the EMA is
partitioned like the weights and updates without communication. ``state_dict`` gathers the full tensors (collective:
every rank calls it), so a checkpoint's EMA is the same file at any world size, and ``load_state_dict`` takes this
rank's partition back out of them. ``averaged`` puts the averaged weights into the partitions (and into the full
copies ZeRO-3 keeps of its small "persistent" parameters), so the module's next gathers see them.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn


def _partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor") and hasattr(p, "ds_numel")


def _local(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank averages: ZeRO-3's flat partition of ``p``, or ``p`` itself."""
    return p.ds_tensor if _partitioned(p) else p


def _gather_full(partition: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The full tensor of ``p`` (shape ``p.ds_shape``) from every rank's ``partition`` of it (collective over its
    ZeRO group)."""
    group = getattr(p, "ds_process_group", None)
    world = dist.get_world_size(group=group) if dist.is_initialized() else 1
    parts = [torch.empty_like(partition) for _ in range(world)]
    if world > 1:
        dist.all_gather(parts, partition.contiguous(), group=group)
    else:
        parts = [partition]
    return torch.cat(parts)[: p.ds_numel].view(p.ds_shape)


def _my_partition(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a full tensor of ``p``, laid out as ZeRO-3 partitions it (flat, padded at the end)."""
    group = getattr(p, "ds_process_group", None)
    rank = dist.get_rank(group=group) if dist.is_initialized() else 0
    size = p.ds_tensor.numel()
    flat = full.reshape(-1)
    flat = torch.cat([flat, flat.new_zeros(max(0, size * (rank + 1) - flat.numel()))])
    return flat[rank * size:(rank + 1) * size]


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: _local(p).detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}
        self.partitioned = any(_partitioned(p) for p in module.parameters())

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        # One multi-tensor lerp instead of a kernel per parameter (hundreds at DiT-2B size, every step).
        pairs = [(self.shadow[name], _local(p).detach().float()) for name, p in module.named_parameters()
                 if name in self.shadow]
        if pairs:
            shadows, current = zip(*pairs)
            torch._foreach_lerp_(list(shadows), list(current), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Load the averaged weights into ``module`` (collective under ZeRO-3: the persistent parameters' full copies
        are gathered)."""
        for name, p in module.named_parameters():
            if name not in self.shadow:
                continue
            _local(p).copy_(self.shadow[name].to(p.dtype))
            if _partitioned(p) and p.numel() == p.ds_numel:  # a full copy ZeRO-3 keeps (persistent parameter)
                p.data.copy_(_gather_full(self.shadow[name], p).to(p.dtype))

    @contextmanager
    def averaged(self, module: nn.Module):
        """Temporarily put the averaged weights into ``module`` (evaluation, export); the trained ones come back."""
        with torch.no_grad():
            trained = {n: (_local(p).detach().clone(), p.detach().clone() if _partitioned(p) and p.numel() else None)
                       for n, p in module.named_parameters() if n in self.shadow}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for n, p in module.named_parameters():
                    if n in trained:
                        local, full = trained[n]
                        _local(p).copy_(local)
                        if full is not None and p.numel() == full.numel():
                            p.data.copy_(full)

    def state_dict(self, module: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The averaged weights by parameter name, full tensors (under ZeRO-3 gathered from every rank: collective,
        and ``module`` is needed for the partition layout)."""
        if not self.partitioned:
            return dict(self.shadow)
        params = dict(module.named_parameters())
        return {n: _gather_full(s, params[n]) if _partitioned(params[n]) else s for n, s in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], module: nn.Module | None = None) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        params = dict(module.named_parameters()) if self.partitioned else {}
        for name in self.shadow:
            value = state[name]
            if name in params and _partitioned(params[name]):
                value = _my_partition(value, params[name])
            self.shadow[name].copy_(value)


def maybe_averaged(ema: "EMA | None", module: nn.Module):
    """``ema.averaged(module)`` when there is an EMA, else a no-op context."""
    return ema.averaged(module) if ema is not None else nullcontext(module)
