"""Atomic, resumable checkpoints: DeepSpeed engine states plus the trainer's own state.

Layout under ``<output_dir>/checkpoints``::

    step_000100/            one complete checkpoint
      <engine name>/...     DeepSpeed's files for each engine (model, optimizer partitions per rank)
      trainer_state.json    step, data position, counters, the run config
      tensors.safetensors   EMA weights and other tensors of the trainer (rank 0's), or, under model parallelism,
      tensors_rank<r>.safetensors   every rank's own (a TP group's ranks hold different EMA shards)
      rng_rank<r>.json      every rank's RNG states (python, numpy, torch)
      COMPLETE              written last; a folder without it is not a checkpoint
    latest                  name of the newest complete checkpoint

A checkpoint is written into ``.tmp-step_XXXXXX`` and renamed when complete, so a crash while saving never damages
the last good checkpoint. Nothing is ever unpickled: our files are JSON and safetensors, and DeepSpeed's own files
are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from infra.distributed import barrier

STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"


# ------------------------------------------------------------------------------------------------ RNG states


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


# --------------------------------------------------------------------------------- safe DeepSpeed loading


@contextmanager
def weights_only_loading():
    """Make DeepSpeed read its checkpoint files with ``torch.load(weights_only=True)`` (it defaults to False)."""
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine as tce

    original = tce.TorchCheckpointEngine.load

    def load(self, path, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)

    tce.TorchCheckpointEngine.load = load
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        tce.TorchCheckpointEngine.load = original


def _deepspeed_safe_globals() -> list:
    """Plain-data classes that DeepSpeed puts in its checkpoints (enums and config containers, no code)."""
    allowed = []
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:
        pass
    return allowed


# ------------------------------------------------------------------------------------------- the manager


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, rank: int = 0, keep_last: int = 3):
        self.root, self.rank, self.keep_last = Path(root), rank, keep_last

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def complete_checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if STEP_DIR.match(p.name) and (p / MARKER).is_file()]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def resolve(self, resume: str) -> Path | None:
        """``auto``: the newest complete checkpoint or None; ``none``: None; else a checkpoint folder that must exist."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"run.resume={resume!r} is not a complete checkpoint (no {MARKER} file in it)")
        return path

    def save(self, step: int, engines: dict, trainer_state: dict, tensors: dict[str, torch.Tensor],
             per_rank: bool = False) -> Path:
        """Collective: every rank calls it. Returns the final folder. ``per_rank``: every rank's ``tensors`` differ
        (model-parallel shards) and each is kept; else rank 0's stand for all."""
        final = self.path_for(step)
        tmp = self.root / f".tmp-{final.name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        for name, engine in engines.items():
            engine.save_checkpoint(str(tmp), tag=name, save_latest=False)
        (tmp / f"rng_rank{self.rank}.json").write_text(json.dumps(rng_state()))
        if per_rank:
            save_file(_cpu(tensors), str(tmp / f"tensors_rank{self.rank}.safetensors"))
        barrier()
        if self.rank == 0:
            self._finalize(tmp, final, step, trainer_state, None if per_rank else tensors)
        barrier()
        return final

    def _finalize(self, tmp: Path, final: Path, step: int, trainer_state: dict, tensors: dict | None) -> None:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        if tensors is not None:
            save_file(_cpu(tensors), str(tmp / "tensors.safetensors"))
        _fsync_tree(tmp)
        with open(tmp / MARKER, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = self.root / "latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, self.root / "latest")
        for old in self.complete_checkpoints()[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, engines: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        """Collective: restore engines and this rank's RNG; return (trainer_state, tensors)."""
        with weights_only_loading():
            for name, engine in engines.items():
                load_path, _ = engine.load_checkpoint(str(path), tag=name, load_lr_scheduler_states=False)
                if load_path is None:
                    raise FileNotFoundError(f"checkpoint {path} has no state for engine {name!r}")
        rng_file = path / f"rng_rank{self.rank}.json"
        if rng_file.is_file():  # absent when resuming on more ranks than saved: the RNG then starts fresh
            set_rng_state(json.loads(rng_file.read_text()))
        state = json.loads((path / "trainer_state.json").read_text())
        own = path / f"tensors_rank{self.rank}.safetensors"
        if own.is_file():
            return state, load_file(str(own))
        if not (path / "tensors.safetensors").is_file():
            saved = len(list(path.glob("tensors_rank*.safetensors")))
            raise FileNotFoundError(f"checkpoint {path} holds per-rank trainer tensors (model parallelism) for "
                                    f"{saved} ranks and none for rank {self.rank}: resume with the same ranks")
        return state, load_file(str(path / "tensors.safetensors"))


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
