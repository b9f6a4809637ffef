"""Reading latents cached by ``tools/cache_latents``: resumable batches with the data loader's start_batch contract.

A cache folder holds, per source shard ``i`` (in ``infra.data`` shard order)::

    part-NNNNNN.safetensors   "<j>/latents" (C, F, h, w) normalised first-stage latents of the shard's j-th sample,
                              "<j>/text_states" (L, D) and "<j>/text_mask" (L,) of its caption, padding included
    part-NNNNNN.jsonl         line j: {"key", "caption", "meta"} (the source meta line, ground truth included)
    manifest.json             what made the cache (first stage, text encoder, clip shape, source roots)
    COMPLETE                  written last; a cache without it is refused

Batches follow the same plan as ``infra.data.build_loader`` with one video bucket: step ``s`` on rank ``r`` takes the
slot ``BucketStream(seed, 0, pool).slot(s, r, world_size, batch_size)``. Cached samples keep the source order, so a run
on cached latents sees the samples an on-the-fly run with the same seed sees (when every sample was cached, and the
clips do not depend on the step's random start frame, i.e. clips as long as the videos).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from infra.data.sampling import BucketStream

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
FIELDS = ("latents", "text_states", "text_mask")


def part_name(index: int) -> str:
    return f"part-{index:06d}"


def tensor_name(sample: int, field: str) -> str:
    return f"{sample}/{field}"


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    if not (root / COMPLETE).is_file():
        raise FileNotFoundError(f"latent cache {root} is incomplete or missing (no {COMPLETE} file); "
                                f"run tools/cache_latents to finish it")
    return json.loads((root / MANIFEST).read_text())


class LatentCache:
    """Random access to the samples of a complete cache, in source order."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.entries: list[tuple[Path, int, dict]] = []
        for lines in sorted(self.root.glob("part-*.jsonl")):
            tensors = lines.with_suffix(".safetensors")
            for j, line in enumerate(lines.read_text().splitlines()):
                self.entries.append((tensors, j, json.loads(line)))
        if not self.entries:
            raise ValueError(f"latent cache {self.root} holds no samples")
        self._open: dict[Path, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int) -> dict:
        path, j, line = self.entries[index]
        if path not in self._open:  # memory-mapped, opened once per worker
            self._open[path] = safe_open(str(path), framework="pt")
        handle = self._open[path]
        sample = {f: handle.get_tensor(tensor_name(j, f)) for f in FIELDS}
        return {**sample, "caption": line["caption"], "meta": line["meta"]}


def collate(samples: list[dict]) -> dict:
    """Stack samples (text states all have the encoder's max_length: it pads every prompt to it)."""
    stacked = {f: torch.stack([s[f] for s in samples]) for f in FIELDS}
    stacked["text_mask"] = stacked["text_mask"].bool()
    return {**stacked, "caption": [s["caption"] for s in samples], "meta": [s["meta"] for s in samples]}


class LatentBatchDataset(IterableDataset):
    """Endless batches for one rank from ``start_batch`` on; batch ``k`` depends only on (seed, k, rank)."""

    def __init__(self, root: str | Path, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_batch: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.cache = LatentCache(root)
        self.batch_size, self.rank, self.world_size, self.start_batch = batch_size, rank, world_size, start_batch
        # Bucket 0 of the shard loader's plan: the same permutations, hence the same samples per step.
        self.stream = BucketStream(seed, 0, range(len(self.cache)))

    def batch(self, step: int) -> dict:
        indices = self.stream.slot(step, self.rank, self.world_size, self.batch_size)
        return {**collate([self.cache.load(i) for i in indices]), "kind": "video", "step": step, "skips": {}}

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_batch + worker
        while True:
            yield self.batch(step)
            step += num_workers


def build_latent_loader(root: str | Path, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                        start_batch: int = 0, num_workers: int = 0) -> DataLoader:
    """The DataLoader for one rank; its ``i``-th batch is batch ``start_batch + i`` of the run."""
    dataset = LatentBatchDataset(root, batch_size, rank, world_size, seed, start_batch)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers)
