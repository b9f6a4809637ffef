"""ZeRO-3 helpers: a module made ready for ZeRO-3 (``zero3_ready``, applied by ``infra.engine``), whole parameters
for the few places that need them outside a forward (export, spectral norm's power iteration), and autograd passes
beside the training backward (the VAE's adaptive loss weights).

Model code stays unaware of ZeRO-3; what it must not do is call a ZeRO-3 module that trains outside its engine
(DeepSpeed counts gradient-accumulation micro-steps in the engine's forward) or run data-dependent side passes
(``side_passes_are_collective``).
"""
from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager, nullcontext

from torch import nn

log = logging.getLogger(__name__)


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


@contextmanager
def gathered_before_own_hooks(module: nn.Module):
    """Around ``deepspeed.initialize`` of ``module`` under ZeRO-3: ZeRO-3 gathers a layer's weights in a forward
    pre-hook registered after the layer's own, so a layer whose own pre-hook reads them (``torch.nn.utils.
    spectral_norm``, ``weight_norm``: the PatchGAN's convs) would see them partitioned. On leaving, the layers' own
    pre-hooks are moved behind DeepSpeed's. That order also keeps the normalised weight's backward (made in the hook,
    now after DeepSpeed wrapped the layer's inputs) ahead of the release of the weights at the end of the layer's
    backward. (Making the parent a DeepSpeed leaf module gathers in time too, but DeepSpeed reduces a leaf's
    gradients in a full backward hook, which fires before the weight gradients when the input needs none: the
    discriminator's first layers.)"""
    own = {m: list(m._forward_pre_hooks) for m in module.modules() if m._forward_pre_hooks}
    yield
    for m, keys in own.items():
        for key in keys:
            m._forward_pre_hooks.move_to_end(key)


def gather_loose_parameters(module: nn.Module) -> list[str]:
    """Prepare ``module`` for ZeRO-3 (before ``deepspeed.initialize``): ZeRO-3 gathers a parameter only around the
    forward of the module that owns it. A parameter owned directly by a container (a module with submodules, e.g.
    the SSVAE's LMR mask token) is typically used by a method of it, or by its parent, not inside its own forward,
    and would be seen partitioned, ``(0,)``-shaped. Each becomes an external parameter of ``module``, whole for the
    whole of ``module``'s forward (DeepSpeed's ``register_external_parameter``). Returns their names."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    loose = [(f"{owner}.{name}" if owner else name, p) for owner, m in module.named_modules()
             if m is not module and next(m.children(), None) is not None
             for name, p in m.named_parameters(recurse=False)]
    for _, p in loose:
        register_external_parameter(module, p)
    return [name for name, _ in loose]


@contextmanager
def zero3_ready(module: nn.Module):
    """Around ``deepspeed.initialize`` of ``module`` with ZeRO-3: parameters of containers stay whole for the whole
    forward (``gather_loose_parameters``), the model's own forward pre-hooks run after DeepSpeed's gather
    (``gathered_before_own_hooks``), and side passes restore DeepSpeed's counters (``side_backward``)."""
    loose = gather_loose_parameters(module)
    if loose:
        log.info("%s: ZeRO-3 keeps %s whole for its whole forward (parameters of containers)",
                 type(module).__name__, ", ".join(loose))
    with gathered_before_own_hooks(module):
        yield
    _ZERO3_MODULES.add(module)


# DeepSpeed's per-module backward bookkeeping (deepspeed.runtime.zero.parameter_offload): a module's forward arms
# ``applied_pre_backward_ref_cnt`` (one weight gather before its backward, per forward) and ``ds_grads_remaining``
# (release its weights once every input's gradient has passed).
_BACKWARD_COUNTERS = ("applied_pre_backward_ref_cnt", "ds_grads_remaining")


# Modules whose engines run ZeRO-3 in this process (``zero3_ready``): what ``side_backward`` restores.
_ZERO3_MODULES: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def side_passes_are_collective() -> bool:
    """Whether autograd passes beside the training backward gather weights collectively (a ZeRO-3 engine on several
    ranks). Every rank must then run the same such passes, in the same order: one rank skipping one that another runs
    leaves the other waiting in an all-gather (measured: a 2-rank VAE hung at its second step when LCR's hinge was
    inactive on one rank only and its adaptive weight was skipped there)."""
    import torch.distributed as dist

    return bool(_ZERO3_MODULES) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def side_backward():
    """A context for autograd passes beside the training backward, e.g. ``torch.autograd.grad`` of a loss w.r.t. one
    layer's weight (the adaptive LCR and GAN weights). Under ZeRO-3 such a pass uses up the weight gathers that the
    forward armed for the backward, and the real backward then runs on freed, ``(0,)``-shaped weights ("weight should
    have at least three dimensions"). On leaving, every module of every ZeRO-3 engine gets its counters back, so the
    real backward gathers (and releases) its weights again. A no-op without ZeRO-3 engines."""
    saved = [(m, name, m.__dict__[name]) for root in list(_ZERO3_MODULES) for m in root.modules()
             for name in _BACKWARD_COUNTERS if name in m.__dict__]
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
