"""DeepSpeed-Ulysses sequence parallelism for the transformer.

Each of the P ranks of a process group holds 1/P of the text tokens and 1/P of the video tokens. Everything
in a block except attention is per token, so it runs on the local shard unchanged. Attention needs every
token: the Ulysses wrapper around the model's ``attention_fn`` all-to-alls q, k, v from (B, H, S/P, D)
(all heads, a sequence shard) to (B, H/P, S, D) (a head shard, the whole sequence), runs the unchanged
attention, and all-to-alls the result back. The gathered sequence is in rank order ([text_0, video_0,
text_1, video_1, ...]) rather than model order, which attention does not notice: it has no causal mask and
the rotary positions are applied before ``attention_fn``.

Gradients: ``ulysses_forward`` returns the full output on every rank, and every rank computes the same
loss from it; the parameter gradients of the ranks then *sum* to the single-process gradients (all-reduce
with SUM over the group, or scale the loss by P when the engine averages over a group that includes the
sequence-parallel ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .attention import AttentionFn, set_attention_fn
from .embeddings import unpatchify
from .transformer import CogVideoXTransformer, Tokens


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    inputs = [t.contiguous() for t in x.chunk(world, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(world)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Splits dim scatter_dim over the ranks and concatenates what it receives along gather_dim; the
    gradient goes back by the inverse exchange."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim; every rank then computes the same thing from the result, so the gradient of
    the local shard is its slice of the (identical) incoming gradient."""

    @staticmethod
    def forward(ctx, x, group, dim: int):
        ctx.group, ctx.dim, ctx.length = group, dim, x.shape[dim]
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        start = dist.get_rank(ctx.group) * ctx.length
        return grad.narrow(ctx.dim, start, ctx.length).contiguous(), None, None


class UlyssesAttention:
    """attention_fn wrapper: sequence-sharded (B, H, S/P, D) in and out, head-sharded full-sequence
    attention in between."""

    def __init__(self, inner: AttentionFn, group=None):
        self.inner = inner
        self.group = group

    def __call__(self, q, k, v, key_mask=None):
        world = dist.get_world_size(self.group)
        if q.shape[1] % world:
            raise ValueError(f"sequence parallelism over {world} ranks needs heads divisible by it, got {q.shape[1]}")
        q, k, v = (_AllToAll.apply(t, self.group, 1, 2) for t in (q, k, v))
        if key_mask is not None:
            key_mask = _all_gather(key_mask, self.group, dim=1)
        out = self.inner(q, k, v, key_mask)
        return _AllToAll.apply(out, self.group, 2, 1)


def enable_ulysses(model: CogVideoXTransformer, group=None) -> CogVideoXTransformer:
    """Wraps every attention of model for sequence parallelism over group (idempotent). After this, run the
    model through ``ulysses_forward``."""
    set_attention_fn(model, lambda fn: fn if isinstance(fn, UlyssesAttention) else UlyssesAttention(fn, group))
    return model


def _shard(x: torch.Tensor, dim: int, rank: int, world: int, what: str) -> torch.Tensor:
    if x.shape[dim] % world:
        raise ValueError(f"{what}: {x.shape[dim]} tokens do not split evenly over {world} sequence-parallel ranks")
    n = x.shape[dim] // world
    return x.narrow(dim, rank * n, n)


def ulysses_forward(model: CogVideoXTransformer, latents: torch.Tensor, text_states: torch.Tensor,
                    timestep: torch.Tensor, text_mask: torch.Tensor | None = None, group=None) -> torch.Tensor:
    """The model's forward with the tokens split over group; every rank passes the same inputs and gets the
    full output (B, F, C, H, W). Text and video token counts must divide by the group size."""
    if not all(isinstance(m.attention_fn, UlyssesAttention) for m in model.modules() if hasattr(m, "attention_fn")):
        raise RuntimeError("call enable_ulysses(model, group) before ulysses_forward")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    tokens = model.embed(latents, text_states, timestep, text_mask)
    text_len = tokens.text.shape[1]
    rope = None
    if tokens.rope is not None:
        rope = tuple(_shard(t, 0, rank, world, "video") for t in tokens.rope)
    key_mask = None
    if tokens.key_mask is not None:
        key_mask = torch.cat([_shard(tokens.key_mask[:, :text_len], 1, rank, world, "text"),
                              _shard(tokens.key_mask[:, text_len:], 1, rank, world, "video")], dim=1)
    local = Tokens(
        video=_shard(tokens.video, 1, rank, world, "video"),
        text=_shard(tokens.text, 1, rank, world, "text"),
        temb=tokens.temb, rope=rope, key_mask=key_mask,
    )
    out = model.run_blocks(local)
    patches = _GatherSequence.apply(model.head(out.video, out.temb), group, 1)
    _, frames, _, height, width = latents.shape
    cfg = model.config
    return unpatchify(patches, frames, height, width, cfg.patch_size, cfg.temporal_patch)


class UlyssesTransformer(CogVideoXTransformer):
    """A CogVideoXTransformer whose forward is ``ulysses_forward`` over ``sp_group``.

    ``apply_ulysses`` turns a built model into one by swapping its class, the composable pattern of torch's own
    ``fully_shard``: no method is replaced on the instance, and parameter names, state dicts, EMA, checkpoints and
    exports stay those of the plain model (a wrapper module would prefix every name)."""

    sp_group = None

    def forward(self, latents: torch.Tensor, text_states: torch.Tensor, timestep: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        return ulysses_forward(self, latents, text_states, timestep, text_mask, group=self.sp_group)


def apply_ulysses(model: CogVideoXTransformer, group) -> UlyssesTransformer:
    """Sequence parallelism over ``group`` for ``model`` (in place; returns it): Ulysses attention in every block and
    a forward that splits the tokens, so every rank of the group passes the same inputs and gets the full output."""
    if not isinstance(model, CogVideoXTransformer):
        raise TypeError(f"apply_ulysses expects a CogVideoXTransformer, got {type(model).__name__}")
    enable_ulysses(model, group)
    model.__class__ = UlyssesTransformer
    model.sp_group = group
    return model
