"""DeepSpeed engines built from the run's ``deepspeed:`` section and an optimizer section.

A run can hold several engines (the VAE has a generator and a discriminator, each with its own optimizer and learning
rate); each is a separate ``deepspeed.initialize`` call sharing the one process group.
"""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

import torch
from torch import nn

from infra.config import ConfigError, DeepSpeedConfig, OptimizerConfig

log = logging.getLogger(__name__)


def optimizer_kernel(ds: DeepSpeedConfig, cuda: bool | None = None) -> str:
    """``deepspeed.fused_optimizer`` resolved: "torch" (torch's fused AdamW kernel), "deepspeed" (FusedAdam) or
    "default" (torch's multi-tensor AdamW)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return {"auto": "torch" if cuda else "default", "torch": "torch", "yes": "deepspeed",
            "no": "default"}[ds.fused_optimizer]


def deepspeed_config(ds: DeepSpeedConfig, opt: OptimizerConfig, world_size: int, kernel: str = "default") -> dict:
    """The JSON config DeepSpeed expects. The micro batch is nominal: our data loader, not DeepSpeed's, batches.
    ``kernel``: see ``optimizer_kernel``."""
    if kernel not in ("torch", "deepspeed", "default"):
        raise ValueError(f"kernel must be torch, deepspeed or default, got {kernel!r}")
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
                # torch's own (Adam)W unless FusedAdam is asked for: DeepSpeed JIT-compiles FusedAdam/CPUAdam at
                # start-up (~45 s each, and only where a CUDA toolkit is installed). DeepSpeed passes the other
                # parameters on to torch, "fused" among them.
                "torch_adam": kernel != "deepspeed",
                **({"adam_w_mode": opt.type == "adamw"} if kernel == "deepspeed" else {}),
                **({"fused": True} if kernel == "torch" else {}),
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


# DeepSpeed's ZeRO optimizer check (``is_zero_supported_optimizer``) imports its Muon optimizer module to add it to
# the supported list, and that module's ``torch.compile`` decorators import torch's inductor: 2.2 s of a training
# process's start-up (measured: a 1-step tiny DiT run, 10.7 s in all), for an optimizer this stack never builds
# (``deepspeed_config`` asks for torch's Adam or AdamW). Under ZeRO 1 and 2 the check's ImportError fallback skips
# Muon instead; one rank then never imports it (several do, in their first gradient reduction). ZeRO-3's optimizer
# imports it unconditionally while it is built, so ZeRO-3 pays the 2.2 s.
_MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


@contextmanager
def _muon_not_imported():
    """Within the block, importing DeepSpeed's Muon module raises ImportError (unless something imported it
    already); afterwards it imports as usual."""
    if _MUON_MODULE in sys.modules:
        yield
        return
    sys.modules[_MUON_MODULE] = None  # the import system's "not importable" marker
    try:
        yield
    finally:
        if sys.modules.get(_MUON_MODULE, 0) is None:
            del sys.modules[_MUON_MODULE]


def build_engine(module: nn.Module, ds: DeepSpeedConfig, opt: OptimizerConfig, world_size: int, mpu=None):
    """Wrap ``module`` (only its trainable parameters are optimised) in a DeepSpeed engine.

    ``mpu`` (a model-parallel unit, e.g. ``dit.tensor_parallel.DeepSpeedMPU``) makes DeepSpeed reduce gradients
    and partition ZeRO states over its data-parallel group only; ``train_batch_size`` is then sized by that group,
    not by ``world_size`` (DeepSpeed checks it against the data-parallel size)."""
    import deepspeed

    cuda = torch.cuda.is_available()
    kernel = optimizer_kernel(ds, cuda)
    if ds.precision == "bf16" and not cuda:
        log.warning("bf16 on CPU runs, but slowly; fp32 is the usual CPU choice")
    if mpu is not None:
        world_size = mpu.get_data_parallel_world_size()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters to give an optimizer")
    from pydantic import ValidationError

    from infra.zero3 import zero3_ready

    try:
        with zero3_ready(module) if ds.zero_stage == 3 else _muon_not_imported():
            engine, _, _, _ = deepspeed.initialize(
                model=module, model_parameters=params, mpu=mpu, config=deepspeed_config(ds, opt, world_size, kernel))
    except ValidationError as err:  # DeepSpeed checks its JSON with pydantic; say which of our keys fed it
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"deepspeed.extra: DeepSpeed refused the configuration built from the deepspeed section "
                          f"({problems})") from None
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    log.info("%s: optimizer %s (deepspeed.fused_optimizer=%s: fused=%s, foreach=%s)", type(module).__name__,
             type(inner).__name__, ds.fused_optimizer, getattr(inner, "defaults", {}).get("fused"),
             getattr(inner, "defaults", {}).get("foreach"))
    return engine


def set_learning_rate(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
