"""Megatron-style tensor parallelism for the transformer, applied to a built (and loaded) model.

``apply_tensor_parallel(model, group)`` swaps, in every ``Attention`` and ``FeedForward``, the dense linears
for column / row parallel ones holding this rank's slice of the existing weights, so a converted checkpoint
keeps its numbers:

* attention: to_q, to_k, to_v column parallel (output rows, i.e. whole heads, split over the ranks), the
  attention runs on the local heads, to_out.0 row parallel (its input columns split the same way) with an
  all-reduce of the output;
* MLP: ff.net.0.proj column parallel (GELU is elementwise, so it runs on the shard), ff.net.2 row parallel.

Per block that is one all-reduce in the forward after each row-parallel layer and one in the backward
before each column-parallel group (Megatron's f/g operators). Everything else (embeddings, adaptive norms,
head) stays replicated and sees full activations, so every rank computes the same output and loss, and the
gradients of the replicated parameters are the full single-process gradients on every rank. The one
exception is the QK LayerNorm: its weights are shared by all heads, but a rank only sees its own heads, so
its gradient is all-reduced over the group (``ReplicatedLayerNorm``).

Two backends: ``"megatron"`` uses megatron-core's ColumnParallelLinear / RowParallelLinear (the optional
``megatron`` extra); ``"torch"`` is a plain-torch implementation with the same semantics and parameter
layout, for machines without megatron-core.

Sharded parameters carry Megatron's attributes ``tensor_model_parallel=True`` and ``partition_dim``, which
``gather_tensor_parallel_state_dict`` uses to rebuild the dense state dict (for export or evaluation).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from infra.distributed import parallel_groups

from .attention import Attention
from .transformer import FeedForward

BACKENDS = ("megatron", "torch")
MEGATRON_INSTALL_HINT = "pip install -e .[megatron]"


class _CopyToRegion(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient: the input feeds computations that are split over
    the ranks, so each rank holds only its part of the gradient (Megatron's "f")."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce (sum) forward of partial results; identity backward, as every rank then holds the same
    full gradient (Megatron's "g")."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _mark_sharded(param: nn.Parameter, dim: int) -> None:
    # Megatron's attribute names, so both backends look the same to gathering and grad-norm code.
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local: this rank's output features (plain-torch backend)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        _mark_sharded(self.weight, 0)
        if self.bias is not None:
            _mark_sharded(self.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToRegion.apply(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local W_local^T, + b (replicated): input features split over the ranks
    (plain-torch backend)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        _mark_sharded(self.weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _ReduceFromRegion.apply(F.linear(x, self.weight), self.group)
        # Bias after the reduction, or it would be added once per rank.
        return out if self.bias is None else out + self.bias


class ReplicatedLayerNorm(nn.LayerNorm):
    """LayerNorm whose (replicated) weights are applied to head-sharded activations: their gradient is the
    sum of the ranks' partial gradients."""

    group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else _CopyToRegion.apply(self.weight, self.group)
        bias = None if self.bias is None else _CopyToRegion.apply(self.bias, self.group)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


@functools.cache
def _megatron():
    """megatron-core's layers, with forward returning a tensor like nn.Linear (they return (out, bias))."""
    try:
        from megatron.core import ModelParallelConfig, parallel_state
        from megatron.core.tensor_parallel import ColumnParallelLinear as MColumn
        from megatron.core.tensor_parallel import RowParallelLinear as MRow
    except ImportError as err:
        raise ImportError(
            f"tensor parallelism with backend='megatron' needs megatron-core, which is not installed: "
            f"{MEGATRON_INSTALL_HINT} (or use backend='torch')"
        ) from err

    class TensorOut:
        def forward(self, x):
            out, _ = super().forward(x)  # the second item is a bias only with skip_bias_add, not set here
            return out

    class Column(TensorOut, MColumn):
        pass

    class Row(TensorOut, MRow):
        pass

    return ModelParallelConfig, parallel_state, Column, Row


def init_megatron_parallel_state(tensor_parallel_size: int):
    """Initialises megatron-core's parallel_state on the existing default process group (gloo on CPU,
    NCCL on GPU) with tensor_parallel_size-way tensor parallelism, and returns this rank's TP group.
    Consecutive ranks form a TP group; the remaining factor of the world is Megatron's data parallel."""
    _, parallel_state, _, _ = _megatron()
    if not parallel_state.model_parallel_is_initialized():
        # No extra gloo groups: on CPU the default groups are gloo already.
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size,
                                                 create_gloo_process_groups=False)
    return parallel_state.get_tensor_model_parallel_group()


def _shard(x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    return x.detach().chunk(world, dim=dim)[rank].clone()


def _parallel_linear(linear: nn.Linear, kind: str, group, backend: str) -> nn.Module:
    """A column or row parallel replacement of linear holding this rank's slice of its weights."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dim = 0 if kind == "column" else 1
    if linear.weight.shape[dim] % world:
        raise ValueError(f"tensor parallelism over {world} ranks: {kind}-parallel linear of shape "
                         f"{tuple(linear.weight.shape)} does not split evenly")
    weight = _shard(linear.weight, dim, rank, world)
    bias = None
    if linear.bias is not None:
        bias = _shard(linear.bias, 0, rank, world) if kind == "column" else linear.bias.detach().clone()

    if backend == "torch":
        layer = (ColumnParallelLinear if kind == "column" else RowParallelLinear)(weight, bias, group)
    else:
        ModelParallelConfig, _, Column, Row = _megatron()
        # CPU initialisation without random init: megatron allocates, we fill it with the existing weights
        # (this also keeps megatron's CUDA RNG tracker out of the way on CPU).
        config = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True,
                                     perform_initialization=False, params_dtype=linear.weight.dtype)
        common = dict(config=config, init_method=nn.init.zeros_, bias=bias is not None, tp_group=group)
        if kind == "column":
            layer = Column(linear.in_features, linear.out_features, gather_output=False, **common)
        else:
            layer = Row(linear.in_features, linear.out_features, input_is_parallel=True, skip_bias_add=False, **common)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        # megatron marks the weight only when it initialises it itself.
        _mark_sharded(layer.weight, dim)
    layer.to(linear.weight.device)
    for p in layer.parameters():
        p.requires_grad_(linear.weight.requires_grad)
    return layer


def _replicated_norm(norm: nn.LayerNorm, group) -> ReplicatedLayerNorm:
    out = ReplicatedLayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                              bias=norm.bias is not None)
    first = next(norm.parameters(), None)
    if first is not None:
        out.to(first.device, first.dtype)
    out.load_state_dict(norm.state_dict())
    out.group = group
    return out


def apply_tensor_parallel(model: nn.Module, tp_group=None, backend: str = "megatron") -> nn.Module:
    """Shards model's attention and MLP linears over tp_group in place (after building and loading it) and
    returns it. Every rank must hold the same weights and pass the same inputs; each gets the full output.

    tp_group: the tensor-parallel process group. None means megatron-core's parallel_state TP group for
    backend="megatron" (see ``init_megatron_parallel_state``) and the default (world) group for "torch".
    Needs heads divisible by the group size and no dropout inside attention / MLP.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "megatron":
        _, parallel_state, _, _ = _megatron()  # raises ImportError with the install hint
        if tp_group is None:
            if not parallel_state.model_parallel_is_initialized():
                raise RuntimeError("backend='megatron' with tp_group=None needs megatron's parallel_state: call "
                                   "init_megatron_parallel_state(size) first, or pass tp_group")
            tp_group = parallel_state.get_tensor_model_parallel_group()
    if getattr(model, "tensor_parallel_group", None) is not None:
        raise RuntimeError("apply_tensor_parallel was already applied to this model")
    world = dist.get_world_size(tp_group)

    for module in model.modules():
        if isinstance(module, (Attention, FeedForward)):
            for sub in module.modules():
                if isinstance(sub, nn.Dropout) and sub.p > 0:
                    raise ValueError("tensor parallelism needs dropout=0 in attention and MLP: masks of sharded "
                                     "activations would need per-rank random streams")
    for module in list(model.modules()):
        if isinstance(module, Attention):
            if module.heads % world:
                raise ValueError(f"tensor parallelism over {world} ranks needs heads divisible by it, "
                                 f"got {module.heads}")
            for name in ("to_q", "to_k", "to_v"):
                setattr(module, name, _parallel_linear(getattr(module, name), "column", tp_group, backend))
            module.to_out[0] = _parallel_linear(module.to_out[0], "row", tp_group, backend)
            module.heads //= world  # the attention module now works on its local heads only
            if module.norm_q is not None:
                module.norm_q = _replicated_norm(module.norm_q, tp_group)
                module.norm_k = _replicated_norm(module.norm_k, tp_group)
        elif isinstance(module, FeedForward):
            module.net[0].proj = _parallel_linear(module.net[0].proj, "column", tp_group, backend)
            module.net[2] = _parallel_linear(module.net[2], "row", tp_group, backend)
    model.tensor_parallel_group = tp_group
    return model


def tensor_data_parallel_groups(tensor_parallel_size: int):
    """(tp_group, dp_group) of this rank on the default process group, in Megatron's layout: consecutive
    ranks form a TP group (keep them on one node), ranks with the same TP rank form a DP group. Collective:
    every rank must call it (torch.distributed.new_group is). See ``infra.distributed.parallel_groups``."""
    groups = parallel_groups(tensor_parallel_size, 1)
    return groups.tp_group, groups.dp_group


class DeepSpeedMPU:
    """The model-parallel-unit object ``deepspeed.initialize(..., mpu=...)`` takes: DeepSpeed then averages
    gradients (and shards ZeRO states) over dp_group only, and counts sharded parameters (those with
    ``tensor_model_parallel``) across the TP group in the gradient norm. megatron-core's parallel_state lacks
    the ``get_model_parallel_rank/world_size`` names DeepSpeed calls, hence this adapter for both backends."""

    def __init__(self, tp_group, dp_group):
        self.tp_group, self.dp_group = tp_group, dp_group

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return dist.get_rank(self.tp_group)

    def get_tensor_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.tp_group)

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_global_rank(self.tp_group, 0)

    # No pipeline parallelism: the model-parallel group is the TP group.
    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.dp_group)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.dp_group)


def is_tensor_parallel(param: torch.Tensor) -> bool:
    """Whether param is this rank's shard of a larger tensor (else it is replicated over the TP group)."""
    return bool(getattr(param, "tensor_model_parallel", False))


def gather_tensor_parallel_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The dense state dict of a tensor-parallel model (collective: every rank of its group must call it);
    it loads into the model as built before ``apply_tensor_parallel``."""
    group = model.tensor_parallel_group
    params = dict(model.named_parameters())
    out = {}
    for name, value in model.state_dict().items():
        if name.endswith("_extra_state"):  # megatron layers' empty extra state
            continue
        param = params.get(name)
        if param is not None and is_tensor_parallel(param):
            parts = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, value.contiguous(), group=group)
            value = torch.cat(parts, dim=param.partition_dim)
        out[name] = value
    return out
