"""Every trainable parameter gets a gradient on every rank, in every backward pass.

DeepSpeed's ZeRO reduces gradients in buckets filled in the order the parameters' gradient hooks fire. A parameter
that the loss does not reach on one rank (an LMR mask token when that rank drew mask ratio 0, a branch of the model a
batch kind does not take) fires no hook there, so the ranks reduce buckets of different sizes: gloo fails with
"Received data size doesn't match expected size", NCCL usually hangs. torch's DDP has ``find_unused_parameters`` for
this; DeepSpeed has nothing. ``UnusedParameterGuard`` is that, for the engines of our trainer:

- it walks the loss's autograd graph to the parameters it reaches (a few ms for thousands of graph nodes);
- ZeRO 0-2: it adds ``0 * p.sum()`` for each trainable parameter the loss does not reach, so its hook fires with a
  zero gradient, the reductions line up and the update equals that of a run where the parameter had a zero gradient
  (what a single process computes when it skips the parameter: Adam's moments decay either way);
- ZeRO-3: a partitioned parameter outside its module's forward has no full tensor to touch, and DeepSpeed's stage 3
  hangs on unreached parameters even when every rank skips the same ones; the guard stops the run naming them.

Models should still route every parameter into the loss by construction (``vae.lmr`` does); the guard is the net for
the cases nobody thought of.
"""
from __future__ import annotations

import torch
from torch import nn


def reached_parameters(loss: torch.Tensor) -> set[int]:
    """``id``s of the leaf tensors (parameters) the loss's autograd graph reaches."""
    seen, stack, found = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            found.add(id(variable))
        stack.extend(child for child, _ in node.next_functions)
    return found


class UnusedParameterError(RuntimeError):
    """A ZeRO-3 engine's loss did not reach some of its trainable parameters; the message names them."""


class UnusedParameterGuard:
    """Give the trainable parameters of ``module`` that a loss does not reach a zero gradient (see the module doc)."""

    def __init__(self, module: nn.Module, engine_name: str, zero_stage: int, rank: int = 0):
        self.params = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self.engine_name, self.zero_stage, self.rank = engine_name, zero_stage, rank

    def unreached(self, loss: torch.Tensor) -> list[tuple[str, nn.Parameter]]:
        if loss.grad_fn is None:
            return list(self.params)
        reached = reached_parameters(loss)
        return [(name, p) for name, p in self.params if id(p) not in reached]

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss``, plus a zero term for every trainable parameter it does not reach."""
        unreached = self.unreached(loss)
        if not unreached:
            return loss
        if self.zero_stage >= 3:
            names = ", ".join(name for name, _ in unreached[:10]) + (" ..." if len(unreached) > 10 else "")
            raise UnusedParameterError(
                f"engine {self.engine_name!r} on rank {self.rank}: the loss does not reach {len(unreached)} trainable "
                f"parameter(s) ({names}); DeepSpeed ZeRO-3 cannot reduce gradients then (it hangs). Make the model "
                f"use them in every step (or freeze them), or train with deepspeed.zero_stage 1 or 2")
        return loss + sum(p.sum() for _, p in unreached) * 0.0
