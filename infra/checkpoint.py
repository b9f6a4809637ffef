"""Atomic, resumable checkpoints: DeepSpeed engine states plus the trainer's own state.

Layout under ``<output_dir>/checkpoints``::

    step_000100/            one complete checkpoint
      <engine name>/...     DeepSpeed's files for each engine (model, optimizer partitions per rank)
      trainer_state.json    step, data position, counters, the run config
      tensors.safetensors   EMA weights and other tensors of the trainer (rank 0's), or, under model parallelism,
      tensors_rank<r>.safetensors   every rank's own (a TP group's ranks hold different EMA shards)
      rng_rank<r>.json      every rank's RNG states (python, numpy, torch)
      MANIFEST.json         every other file's size and SHA-256
      COMPLETE              written last; a folder without it is not a checkpoint
    latest                  name of the newest complete checkpoint

A checkpoint is written into ``.tmp-step_XXXXXX`` and renamed when complete, so a crash while saving never damages
the last good checkpoint. A checkpoint is resumed from only when its manifest verifies (``verify_checkpoint``); the
trainer falls back to the newest one that does. Nothing is ever unpickled: our files are JSON and safetensors,
DeepSpeed's own files are read with ``torch.load(weights_only=True)``, and DeepSpeed's recovery scripts (which
unpickle) are not kept in the checkpoint: ``python -m infra.export_checkpoint`` is the safe export.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from infra.distributed import all_true, barrier
from infra.reshard import ReshardError, convert_to_universal, load_universal, needs_resharding, saved_partitions, \
    universal_folder
from infra.weights_only import weights_only_loading

STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
# DeepSpeed copies these into every checkpoint; they call torch.load(weights_only=False), so we never ship them.
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint can be resumed from; the message names each checkpoint's bad files."""


class CheckpointDiskFull(OSError):
    """Saving a checkpoint ran out of disk space; the message says where, how much, and the last good checkpoint."""


# ------------------------------------------------------------------------------------------------- manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _listed_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MARKER, MANIFEST))


def write_manifest(folder: Path) -> dict:
    """Record every file of the checkpoint folder (size and SHA-256) in ``MANIFEST.json``."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in _listed_files(folder)}
    manifest = {"algorithm": "sha256", "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def verify_checkpoint(folder: str | os.PathLike, hashes: bool = True) -> list[str]:
    """What is wrong with a checkpoint folder, one line per bad file (empty when it verifies). ``hashes=False``
    checks presence and sizes only (cheap)."""
    folder = Path(folder)
    if not (folder / MARKER).is_file():
        return [f"{folder / MARKER}: missing (the checkpoint was never completed)"]
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return [f"{folder / MANIFEST}: missing (a damaged checkpoint, or one written before manifests)"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{folder / MANIFEST}: unreadable ({e!r})"]
    problems = []
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(f"{path}: {size} bytes, the manifest says {entry['size']} (truncated or replaced)")
        elif hashes and _sha256(path) != entry["sha256"]:
            problems.append(f"{path}: SHA-256 differs from the manifest (the bytes are damaged)")
    return problems


def _tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


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

    def _warn_incomplete(self) -> None:
        """Name the checkpoint folders passed over for a missing COMPLETE marker (a save cut short), above all one that
        ``latest`` names (its marker, written last, was lost)."""
        if not self.root.is_dir() or self.rank != 0:
            return
        latest_file = self.root / "latest"
        latest = latest_file.read_text().strip() if latest_file.is_file() else ""
        for folder in sorted(p for p in self.root.iterdir() if STEP_DIR.match(p.name) and not (p / MARKER).is_file()):
            named = " although latest names it" if folder.name == latest else ""
            log.warning("checkpoint %s is passed over: it has no %s marker (it was never completed)%s", folder,
                        MARKER, named)

    def latest(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def resolve(self, resume: str) -> Path | None:
        """``auto``: the newest complete checkpoint or None; ``none``: None; else a checkpoint folder that must exist."""
        candidates = self.candidates(resume)
        return candidates[0] if candidates else None

    def candidates(self, resume: str) -> list[Path]:
        """The checkpoints to try, in order: ``auto``: every complete one, newest first; ``none``: none; else the
        named folder, which must be a complete checkpoint."""
        if resume == "none":
            return []
        if resume == "auto":
            self._warn_incomplete()
            return self.complete_checkpoints()[::-1]
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"run.resume={resume!r} is not a complete checkpoint (no {MARKER} file in it)")
        return [path]

    def save(self, step: int, engines: dict, trainer_state: dict, tensors: dict[str, torch.Tensor],
             per_rank: bool = False) -> Path:
        """Collective: every rank calls it. Returns the final folder. ``per_rank``: every rank's ``tensors`` differ
        (model-parallel shards) and each is kept; else rank 0's stand for all."""
        final = self.path_for(step)
        tmp = self.root / f".tmp-{final.name}"
        try:
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
        except Exception as e:
            self._raise_if_disk_full(e, tmp, step)
            raise
        barrier()
        return final

    def _raise_if_disk_full(self, error: Exception, tmp: Path, step: int) -> None:
        """Turn a failed save on a full disk (ENOSPC, or torch's bare 'iostream error') into an error that says so."""
        free = shutil.disk_usage(self.root if self.root.exists() else self.root.parent).free
        written = _tree_size(tmp)
        last = self.latest()
        needed = _tree_size(last) if last is not None else written
        no_space = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) or \
            free < max(needed - written, 0) or free < (1 << 20)
        if not no_space:
            return
        shutil.rmtree(tmp, ignore_errors=True)  # give the half-written checkpoint's space back
        raise CheckpointDiskFull(
            errno.ENOSPC,
            f"disk full while saving checkpoint step {step} to {tmp}: it needs about {needed / 2**20:.1f} MiB "
            f"(the size of the last checkpoint), {free / 2**20:.1f} MiB are free on that file system "
            f"({written / 2**20:.1f} MiB were written, now removed); the last good checkpoint is "
            f"{last if last is not None else 'none'}") from error

    def _finalize(self, tmp: Path, final: Path, step: int, trainer_state: dict, tensors: dict | None) -> None:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        if tensors is not None:
            save_file(_cpu(tensors), str(tmp / "tensors.safetensors"))
        for script in RECOVERY_SCRIPTS:
            for path in tmp.rglob(script):
                path.unlink()
        write_manifest(tmp)
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
            shutil.rmtree(universal_folder(old), ignore_errors=True)

    def load(self, path: Path, engines: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        """Collective: restore engines and this rank's RNG; return (trainer_state, tensors). An engine saved by
        another number of data-parallel ranks is converted to DeepSpeed's universal checkpoint first
        (``infra.reshard``)."""
        for name, engine in engines.items():
            if not (path / name).is_dir():
                raise FileNotFoundError(f"checkpoint {path} has no state for engine {name!r}")
            if needs_resharding(engine, path / name):
                self._load_resharded(path, name, engine)
                continue
            with weights_only_loading():
                try:
                    load_path, _ = engine.load_checkpoint(str(path), tag=name, load_lr_scheduler_states=False)
                except Exception as e:  # DeepSpeed's bare asserts and torch's reader errors name no file
                    raise CheckpointError(f"{path / name}: DeepSpeed could not load engine {name!r} ({e!r})") from e
                if load_path is None:
                    raise FileNotFoundError(f"checkpoint {path} has no state for engine {name!r}")
        rng_file = path / f"rng_rank{self.rank}.json"
        if rng_file.is_file():  # absent when resuming on more ranks than saved: the RNG then starts fresh
            set_rng_state(_read_json(rng_file))
        state = _read_json(path / "trainer_state.json")
        own = path / f"tensors_rank{self.rank}.safetensors"
        if own.is_file():
            return state, load_file(str(own))
        if not (path / "tensors.safetensors").is_file():
            saved = len(list(path.glob("tensors_rank*.safetensors")))
            if not saved:
                raise FileNotFoundError(f"{path / 'tensors.safetensors'}: missing (the trainer's EMA and task tensors)")
            raise FileNotFoundError(f"checkpoint {path} holds per-rank trainer tensors (model parallelism) for "
                                    f"{saved} ranks and none for rank {self.rank}: resume with the same ranks")
        return state, load_file(str(path / "tensors.safetensors"))


    def _load_resharded(self, path: Path, name: str, engine) -> None:
        """Load engine ``name`` saved by another data-parallel size: the main process converts it to a universal
        checkpoint (once; reused by later resumes), every rank loads that."""
        saved, _ = saved_partitions(path / name)
        target = universal_folder(path)
        problem = ""
        if self.rank == 0:
            try:
                cost = convert_to_universal(path / name, target / name)
                log.info("engine %r of %s: written by %d data-parallel ranks, resuming on %d: %s universal checkpoint "
                         "%s (%.1f MiB, %.1f s)", name, path, saved, engine.dp_world_size,
                         "converted to" if cost["seconds"] else "reusing the", target / name,
                         cost["bytes"] / 2**20, cost["seconds"])
            except Exception as e:
                problem = str(e) if isinstance(e, ReshardError) else f"converting it failed ({e!r})"
        if not all_true(not problem):
            raise ReshardError(
                f"{path / name}: the checkpoint verifies, but it was written by {saved} data-parallel ranks and this "
                f"run has {engine.dp_world_size}, and it cannot be re-partitioned: {problem or 'see the main process'}"
                f". Resume with {saved} data-parallel ranks, or convert it by hand with python -m "
                f"deepspeed.checkpoint.ds_to_universal")
        try:
            load_universal(engine, target, name)
        except Exception as e:
            raise ReshardError(f"{path / name}: written by {saved} data-parallel ranks; loading its universal form "
                               f"{target / name} on {engine.dp_world_size} ranks failed ({e!r}). Resume with {saved} "
                               f"data-parallel ranks") from e


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e!r})") from e


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
