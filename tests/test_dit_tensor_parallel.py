"""Tensor parallelism: 2 gloo processes give the single-process outputs and gradients, with the plain-torch
backend always and with megatron-core when it is installed."""

import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from infra.distributed import free_port

WORLD = 2
# find_spec, not an import: importing megatron.core costs ~10 s that only the spawned workers need to pay.
HAVE_MEGATRON = importlib.util.find_spec("megatron") is not None \
    and importlib.util.find_spec("megatron.core") is not None


def _worker(rank: int, port: int, backend: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        tp_group = None
        if backend == "megatron":
            from dit.tensor_parallel import init_megatron_parallel_state

            init_megatron_parallel_state(WORLD)  # apply_tensor_parallel then takes its TP group
        # One spawn for both position kinds: process start-up dominates the time.
        for positional_embedding, use_mask in [("rope", False), ("sincos", True)]:
            _check(backend, tp_group, positional_embedding, use_mask)
    finally:
        if backend == "megatron":
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _check(backend: str, tp_group, positional_embedding: str, use_mask: bool) -> None:
    from dit import CogVideoXTransformer
    from dit.tensor_parallel import apply_tensor_parallel, gather_tensor_parallel_state_dict, is_tensor_parallel
    from helpers.dit_parallel_case import dense_and_copy, inputs

    rank = dist.get_rank()
    reference, parallel = dense_and_copy(positional_embedding)
    config = reference.config  # same weights and inputs on both ranks
    apply_tensor_parallel(parallel, tp_group, backend=backend)
    latents, text, timestep, mask, target = inputs(use_mask)

    # The model really is sharded: half the heads and half of each sharded weight per rank.
    attn = parallel.transformer_blocks[0].attn1
    assert attn.heads == config.num_attention_heads // WORLD
    assert attn.to_q.weight.shape == (config.inner_dim // WORLD, config.inner_dim)
    assert parallel.transformer_blocks[0].ff.net[2].weight.shape == (config.inner_dim, 4 * config.inner_dim // WORLD)

    expected = reference(latents, text, timestep, text_mask=mask)
    (expected - target).square().mean().backward()
    got = parallel(latents, text, timestep, text_mask=mask)
    (got - target).square().mean().backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # Replicated parameters (QK norms included) get the full gradient on every rank; sharded ones this
    # rank's slice of it.
    dense = dict(reference.named_parameters())
    sharded = 0
    for name, p in parallel.named_parameters():
        want = dense[name].grad
        if is_tensor_parallel(p):
            want = want.chunk(WORLD, dim=p.partition_dim)[rank]
            sharded += 1
        torch.testing.assert_close(p.grad, want, atol=1e-5, rtol=1e-4, msg=f"{backend} {positional_embedding}: {name}")
    # Per block: q, k, v weight + bias; to_out.0 weight; ff.net.0.proj weight + bias; ff.net.2 weight.
    assert sharded == config.num_layers * (3 * 2 + 1 + 2 + 1)

    # The gathered state dict is the dense one and loads into a fresh dense model.
    gathered = gather_tensor_parallel_state_dict(parallel)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(gathered[name], value, atol=0, rtol=0, msg=name)
    CogVideoXTransformer(config).load_state_dict(gathered)


def _spawn(backend: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_worker, args=(free_port(), backend), nprocs=WORLD, join=True)


def test_torch_tensor_parallel_matches_single_process():
    _spawn("torch")


@pytest.mark.skipif(not HAVE_MEGATRON, reason="megatron-core not installed (pip install -e .[megatron])")
def test_megatron_tensor_parallel_matches_single_process():
    _spawn("megatron")


def _deepspeed_worker(rank: int, port: int) -> None:
    """TP 2 x DP 1 under a ZeRO-2 engine that gets the groups through DeepSpeedMPU: the global gradient norm
    (clipping) and the step equal the dense single-process ones."""
    os.environ.update(OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        import deepspeed

        from dit import CogVideoXTransformer, DiTConfig
        from dit.tensor_parallel import (DeepSpeedMPU, apply_tensor_parallel, gather_tensor_parallel_state_dict,
                                         tensor_data_parallel_groups)
        from infra.config import DeepSpeedConfig, OptimizerConfig
        from infra.engine import deepspeed_config

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # plain gloo, no g++ build
        tp_group, dp_group = tensor_data_parallel_groups(WORLD)
        assert dist.get_world_size(tp_group) == WORLD and dist.get_world_size(dp_group) == 1

        torch.manual_seed(0)
        config = DiTConfig.preset("tiny", patch_size=1)
        reference = CogVideoXTransformer(config)
        parallel = CogVideoXTransformer(config)
        parallel.load_state_dict(reference.state_dict())
        apply_tensor_parallel(parallel, tp_group, backend="torch")
        opt = OptimizerConfig(type="adamw", lr=1e-3, weight_decay=0.01)
        ds = DeepSpeedConfig(zero_stage=2, gradient_clipping=1e-3)  # small: clipping is active
        mpu = DeepSpeedMPU(tp_group, dp_group)
        engine, _, _, _ = deepspeed.initialize(
            model=parallel, model_parameters=list(parallel.parameters()), mpu=mpu,
            config=deepspeed_config(ds, opt, world_size=mpu.get_data_parallel_world_size(), kernel="default"))
        latents, text, timestep = torch.randn(2, 2, 16, 4, 4), torch.randn(2, 8, 32), torch.tensor([3, 800])
        target = torch.randn_like(latents)

        (reference(latents, text, timestep) - target).square().mean().backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), ds.gradient_clipping)
        dense_opt = torch.optim.AdamW(reference.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                      weight_decay=opt.weight_decay)
        dense_opt.step()
        engine.backward((engine(latents, text, timestep) - target).square().mean())
        engine.step()

        # Replicated parameters counted once, shards summed over the TP group.
        torch.testing.assert_close(torch.as_tensor(engine.get_global_grad_norm()).float(), norm, rtol=1e-4, atol=0)
        gathered = gather_tensor_parallel_state_dict(engine.module)
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(gathered[name], value, atol=1e-6, rtol=1e-5, msg=name)
    finally:
        dist.destroy_process_group()


def test_deepspeed_zero2_with_tensor_parallel_matches_dense_step():
    pytest.importorskip("deepspeed")
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_deepspeed_worker, args=(free_port(),), nprocs=WORLD, join=True)


def test_megatron_missing_says_how_to_install(monkeypatch):
    import sys

    from dit import CogVideoXTransformer, DiTConfig
    from dit import tensor_parallel

    tensor_parallel._megatron.cache_clear()
    monkeypatch.setitem(sys.modules, "megatron", None)  # makes `import megatron...` raise ImportError
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    try:
        with pytest.raises(ImportError, match=r"pip install -e \.\[megatron\]"):
            tensor_parallel.apply_tensor_parallel(CogVideoXTransformer(DiTConfig.preset("tiny")))
    finally:
        tensor_parallel._megatron.cache_clear()


def test_refuses_bad_backend_and_dropout():
    from dit import CogVideoXTransformer, DiTConfig
    from dit.tensor_parallel import apply_tensor_parallel

    model = CogVideoXTransformer(DiTConfig.preset("tiny"))
    with pytest.raises(ValueError, match="backend"):
        apply_tensor_parallel(model, backend="deepspeed")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="dropout"):
            apply_tensor_parallel(CogVideoXTransformer(DiTConfig.preset("tiny", dropout=0.1)), backend="torch")
    finally:
        dist.destroy_process_group()
