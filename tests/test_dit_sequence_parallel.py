"""Ulysses sequence parallelism: 2 gloo processes give the single-process outputs and gradients."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from infra.distributed import free_port

WORLD = 2


# One spawn for all cases: process start-up dominates the time. "function": enable_ulysses + ulysses_forward;
# "apply": apply_ulysses, then the model's ordinary call (what parallelize_dit does).
CASES = [("rope", False, "function"), ("sincos", True, "apply")]


def _worker(rank: int, port: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for positional_embedding, use_mask, how in CASES:
            _check(positional_embedding, use_mask, how)
    finally:
        dist.destroy_process_group()


def _check(positional_embedding: str, use_mask: bool, how: str) -> None:
    from dit import CogVideoXTransformer
    from dit.sequence_parallel import UlyssesTransformer, apply_ulysses, enable_ulysses, ulysses_forward
    from helpers.dit_parallel_case import dense_and_copy, inputs

    reference, parallel = dense_and_copy(positional_embedding)
    names = list(parallel.state_dict())
    latents, text, timestep, mask, target = inputs(use_mask)
    expected = reference(latents, text, timestep, text_mask=mask)
    (expected - target).square().mean().backward()
    if how == "apply":
        apply_ulysses(parallel, dist.group.WORLD)
        # Nothing patched on the instance, the same names (checkpoints, EMA and exports are the plain model's).
        assert type(parallel) is UlyssesTransformer and isinstance(parallel, CogVideoXTransformer)
        assert "forward" not in vars(parallel) and list(parallel.state_dict()) == names
        got = parallel(latents, text, timestep, text_mask=mask)
    else:
        enable_ulysses(parallel)
        got = ulysses_forward(parallel, latents, text, timestep, text_mask=mask)
    (got - target).square().mean().backward()

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for (name, p), (_, q) in zip(reference.named_parameters(), parallel.named_parameters()):
        grad = q.grad.clone()
        dist.all_reduce(grad)  # the ranks' gradients sum to the single-process gradient
        torch.testing.assert_close(grad, p.grad, atol=1e-5, rtol=1e-4, msg=f"{positional_embedding}: {name}")


def test_ulysses_matches_single_process():
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)


def test_ulysses_forward_needs_enable():
    from dit import CogVideoXTransformer, DiTConfig
    from dit.sequence_parallel import ulysses_forward

    model = CogVideoXTransformer(DiTConfig.preset("tiny"))
    with pytest.raises(RuntimeError, match="enable_ulysses"):
        ulysses_forward(model, torch.zeros(1, 2, 16, 4, 4), torch.zeros(1, 8, 32), torch.tensor([1]))
