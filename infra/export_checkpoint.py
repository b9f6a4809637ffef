"""Export one engine's weights from a checkpoint as safetensors, without running any pickled code.

DeepSpeed's advice is to run the ``zero_to_fp32.py`` it copies into each checkpoint; that script unpickles with
``torch.load(weights_only=False)``, so a crafted checkpoint runs code for whoever follows it. Our checkpoints do not
ship it. This command is the safe replacement: it verifies the checkpoint's manifest, then reads every file
weights-only.

    python -m infra.export_checkpoint runs/x/checkpoints/step_001000 --engine model --out model.safetensors
    python -m infra.export_checkpoint runs/x/checkpoints/step_001000 --engine model --ema --out ema.safetensors

``--engine`` is the engine's folder in the checkpoint (``model`` for the DiT, ``autoencoder`` / ``discriminator``
for the VAE). Without ``--ema`` the fp32 master weights are consolidated from the ZeRO partitions (any stage); with
``--ema`` the trainer's EMA copy is written (``tensors.safetensors``; no DeepSpeed file is read).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from infra.checkpoint import CheckpointError, verify_checkpoint
from infra.weights_only import weights_only_torch_load

log = logging.getLogger(__name__)


def master_weights(checkpoint: Path, engine: str) -> dict[str, torch.Tensor]:
    """The engine's fp32 weights, consolidated from its ZeRO files, read weights-only."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (checkpoint / engine).is_dir():
        found = sorted(p.name for p in checkpoint.iterdir() if p.is_dir())
        raise CheckpointError(f"{checkpoint / engine}: no such engine folder (this checkpoint has {found})")
    with weights_only_torch_load():
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=engine)


def ema_weights(checkpoint: Path, engine: str) -> dict[str, torch.Tensor]:
    """The trainer's EMA of the engine (rank 0's file; under model parallelism each rank's shard is separate)."""
    path = checkpoint / "tensors.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a model-parallel run keeps per-rank EMA shards; export each rank's "
                              "tensors_rank<r>.safetensors instead)")
    prefix = f"ema.{engine}."
    weights = {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    if not weights:
        raise CheckpointError(f"{path}: no EMA for engine {engine!r}")
    return weights


def export_checkpoint(checkpoint: str | Path, engine: str, out: str | Path, ema: bool = False,
                      verify: bool = True) -> Path:
    checkpoint, out = Path(checkpoint), Path(out)
    if verify:
        problems = verify_checkpoint(checkpoint)
        if problems:
            raise CheckpointError(f"{checkpoint} does not verify, so nothing is exported:\n  " + "\n  ".join(problems))
    weights = ema_weights(checkpoint, engine) if ema else master_weights(checkpoint, engine)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(out))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder (…/checkpoints/step_XXXXXX)")
    parser.add_argument("--engine", default="model", help="engine folder in the checkpoint (default: model)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the master weights")
    parser.add_argument("--no-verify", action="store_true", help="skip the manifest check (not recommended)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = export_checkpoint(args.checkpoint, args.engine, args.out, args.ema, not args.no_verify)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
