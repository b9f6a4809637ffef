"""DeepSpeed engines built from the run's ``deepspeed:`` section and an optimizer section.

A run can hold several engines (the VAE has a generator and a discriminator, each with its own optimizer and learning
rate); each is a separate ``deepspeed.initialize`` call sharing the one process group.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from infra.config import ConfigError, DeepSpeedConfig, OptimizerConfig

log = logging.getLogger(__name__)


def deepspeed_config(ds: DeepSpeedConfig, opt: OptimizerConfig, world_size: int, use_fused: bool) -> dict:
    """The JSON config DeepSpeed expects. The micro batch is nominal: our data loader, not DeepSpeed's, batches."""
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "train_batch_size": ds.gradient_accumulation_steps * world_size,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "optimizer": {
            "type": "AdamW" if opt.type == "adamw" else "Adam",
            "params": {
                "lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay,
                # torch's own (Adam)W on CPU: DeepSpeed would otherwise JIT-compile FusedAdam/CPUAdam (~45 s each).
                "torch_adam": not use_fused,
                **({"adam_w_mode": opt.type == "adamw"} if use_fused else {}),
            },
        },
        "steps_per_print": 10**9,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if ds.zero_stage == 3:
        cfg["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=True)
    _deep_update(cfg, dict(ds.extra))
    return cfg


def _deep_update(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def build_engine(module: nn.Module, ds: DeepSpeedConfig, opt: OptimizerConfig, world_size: int, mpu=None):
    """Wrap ``module`` (only its trainable parameters are optimised) in a DeepSpeed engine.

    ``mpu`` (a model-parallel unit, e.g. ``dit.tensor_parallel.DeepSpeedMPU``) makes DeepSpeed reduce gradients
    and partition ZeRO states over its data-parallel group only; ``train_batch_size`` is then sized by that group,
    not by ``world_size`` (DeepSpeed checks it against the data-parallel size)."""
    import deepspeed

    cuda = torch.cuda.is_available()
    use_fused = {"auto": cuda, "yes": True, "no": False}[ds.fused_optimizer]
    if ds.precision == "bf16" and not cuda:
        log.warning("bf16 on CPU runs, but slowly; fp32 is the usual CPU choice")
    if mpu is not None:
        world_size = mpu.get_data_parallel_world_size()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters to give an optimizer")
    from pydantic import ValidationError

    try:
        engine, _, _, _ = deepspeed.initialize(
            model=module, model_parameters=params, mpu=mpu, config=deepspeed_config(ds, opt, world_size, use_fused))
    except ValidationError as err:  # DeepSpeed checks its JSON with pydantic; say which of our keys fed it
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"deepspeed.extra: DeepSpeed refused the configuration built from the deepspeed section "
                          f"({problems})") from None
    return engine


def set_learning_rate(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
