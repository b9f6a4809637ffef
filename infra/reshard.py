"""Resume a checkpoint on another number of data-parallel ranks, through DeepSpeed's universal checkpoint.

ZeRO 1-3 split the optimizer states (and under ZeRO-3 the weights) into one file per data-parallel rank, and
DeepSpeed loads such a checkpoint only at the world size that wrote it. Its universal checkpoint
(``deepspeed.checkpoint.ds_to_universal``) re-expresses the partitions per parameter (fp32 weight, Adam's moments,
step), which ZeRO at any data-parallel size loads (``checkpoint.load_universal``).

When a run resumes at another data-parallel size, ``CheckpointManager.load`` converts each engine once, on the main
process, into ``<checkpoints>/universal/step_NNNNNN/<engine>/`` (kept beside the original, which stays as written and
verified; a ``COMPLETE`` marker makes an interrupted conversion start again), and every rank loads from there. The
conversion reads DeepSpeed's files weights-only (``weights_only_torch_load``), like everything else here.

The conversion runs in a fresh process (``python -m infra.reshard``) with one OpenMP thread: DeepSpeed's converter
forks worker processes, and a fork taken after torch's OpenMP thread pool has started hangs in the workers' first
parallel torch op (GNU libgomp is not fork-safe). A run resuming with 2 threads did just that, for ever; a fresh
one-thread process forks safely.

The conversion restores parameters and optimizer states; the module's buffers (spectral norm's vectors) are copied
from the checkpoint's model states after it (``restore_buffers``). What stays world-size free without help: the
trainer's state (step, global data position), the EMA (``tensors.safetensors``), and the data order and random
draws, which follow the global batch index (``infra.data.sampling``, ``infra.batch_generator``).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from infra.child_env import python_child_env
from infra.weights_only import deepspeed_safe_globals, weights_only_torch_load

log = logging.getLogger(__name__)

UNIVERSAL_DIR = "universal"
MARKER = "COMPLETE"
_PARTITION = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


class ReshardError(RuntimeError):
    """A checkpoint that verifies but cannot be loaded at this run's data-parallel size; the message says why and
    what to do."""


def saved_partitions(engine_dir: Path) -> tuple[int, int]:
    """(data-parallel ranks, model-parallel ranks) whose ZeRO optimizer partitions an engine folder holds; (0, 0)
    for an engine saved without ZeRO partitions (stage 0: its states are world-size free)."""
    dp, mp = set(), set()
    for path in engine_dir.iterdir():
        match = _PARTITION.match(path.name)
        if match:
            dp.add(int(match.group(1)))
            mp.add(int(match.group(2)))
    return len(dp), len(mp)


def needs_resharding(engine, engine_dir: Path) -> bool:
    """Whether ``engine`` (at this run's data-parallel size) cannot load ``engine_dir`` as written."""
    saved_dp, _ = saved_partitions(engine_dir)
    return saved_dp > 0 and saved_dp != engine.dp_world_size


def universal_folder(checkpoint: Path) -> Path:
    """Where the universal form of ``<root>/step_NNNNNN`` goes: ``<root>/universal/step_NNNNNN``."""
    return checkpoint.parent / UNIVERSAL_DIR / checkpoint.name


def convert_to_universal(engine_dir: Path, out: Path) -> dict:
    """Convert one engine's ZeRO checkpoint folder into DeepSpeed's universal form at ``out`` (skipped when a
    complete conversion is there). Returns {"seconds", "bytes"} of the conversion (seconds 0 when reused)."""
    if (out / MARKER).is_file():
        return {"seconds": 0.0, "bytes": _tree_size(out)}
    saved_dp, saved_mp = saved_partitions(engine_dir)
    if saved_mp > 1:
        raise ReshardError(f"{engine_dir}: written with {saved_mp}-way tensor parallelism; DeepSpeed's universal "
                           f"checkpoint re-partitions only data parallelism of such models here, so resume with "
                           f"{saved_dp} data-parallel ranks (x {saved_mp} tensor-parallel)")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    extract_workers = max(1, min(4, os.cpu_count() or 1))  # 2 workers: 13.0 s against 18.0 s for 1 (README)
    start = time.perf_counter()
    # A fresh one-thread process (module docstring): this one's OpenMP pool would hang the converter's forked workers.
    # Its output (DeepSpeed's progress bars) goes to this run's log, as when it ran in-process.
    cmd = [sys.executable, "-m", "infra.reshard", str(engine_dir), str(out), "--extract-workers", str(extract_workers)]
    proc = subprocess.run(cmd, env=python_child_env(OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise ReshardError(f"{engine_dir}: DeepSpeed's conversion to a universal checkpoint failed (exit "
                           f"{proc.returncode}; its output is above)")
    seconds = time.perf_counter() - start
    # The universal loader reads the model states (step counters) from the tag folder itself; load_universal restores
    # the module's buffers from them.
    for model_file in engine_dir.glob("*model_states.pt"):
        if not (out / model_file.name).exists():
            shutil.copy2(model_file, out / model_file.name)
    (out / MARKER).write_text(f"converted from {engine_dir} ({saved_dp} data-parallel ranks) in {seconds:.2f} s\n")
    return {"seconds": seconds, "bytes": _tree_size(out)}


def load_universal(engine, universal_checkpoint: Path, name: str) -> None:
    """Load ``<universal_checkpoint>/<name>`` into ``engine`` at its data-parallel size (collective)."""
    config = engine._config
    previous = config.load_universal_checkpoint
    config.load_universal_checkpoint = True  # DeepSpeed reads this flag at load time, not only at initialisation
    try:
        with weights_only_torch_load():
            load_path, _ = engine.load_checkpoint(str(universal_checkpoint), tag=name, load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = previous
    if load_path is None:
        raise FileNotFoundError(f"{universal_checkpoint / name}: DeepSpeed found no universal checkpoint there")
    restore_buffers(engine.module, universal_checkpoint / name)


def restore_buffers(module, folder: Path) -> list[str]:
    """Copy ``module``'s saved buffers from the checkpoint's model states in ``folder``; returns their names.

    DeepSpeed's universal load restores parameters and optimizer states but never loads the module's state dict, so
    buffers would keep their fresh values: the PatchGAN's spectral-norm u/v vectors (measured: a VAE resumed on
    another number of ranks drifted by 2e-3 in its GAN terms from the first step on), running statistics."""
    import torch

    buffers = dict(module.named_buffers())
    if not buffers:  # nothing to restore: the (possibly large) model states are not read
        return []
    files = sorted(folder.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{folder}: no model states file (*model_states.pt) to restore the buffers from")
    # Weights-only (plain-data DeepSpeed classes admitted); memory-mapped, so only the buffers are read from disk.
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        saved = torch.load(files[0], map_location="cpu", weights_only=True, mmap=True)["module"]
    restored = [name for name in buffers if name in saved]
    with torch.no_grad():
        for name in restored:
            buffers[name].copy_(saved[name])
    return restored


def _tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _convert_here(engine_dir: Path, out: Path, extract_workers: int) -> None:
    """DeepSpeed's ``ds_to_universal`` on one engine folder, reading its files weights-only; what the fresh process of
    ``convert_to_universal`` runs."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(engine_dir), output_folder=str(out), num_extract_workers=extract_workers,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with weights_only_torch_load():
        ds_to_universal.main(args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Convert one engine's ZeRO checkpoint folder to DeepSpeed's universal "
                                                 "checkpoint (what a resume at another data-parallel size runs)")
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--extract-workers", type=int, default=1)
    cli = parser.parse_args()
    _convert_here(cli.engine_dir, cli.out, cli.extract_workers)
