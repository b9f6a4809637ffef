"""The latent cache of DiT training, written and read here: a shard data set encoded once by the frozen first stage
and text encoder, then read back as resumable batches with the data loader's start_batch contract.

Writing (``cache_latents``; command line: ``python -m tools.cache_latents``): the run config names everything, the
videos (``data.video_roots``), the clip cut from each (``data.num_frames`` at ``data.fps``, ``data.height`` x
``data.width``, from the first frame, centre crop), the first stage (its ``encode`` normalises latents by the VAE's
statistics) and the text encoder. Each source shard becomes one part, written atomically; parts already written are
skipped, so an interrupted run resumes where it stopped, and a folder holding a cache made with other settings is
refused rather than mixed. ``transform_cache`` re-expresses a cache through a latent transform without encoding
anything again (posterior means only: a channel-mixing transform such as whitening leaves no diagonal posterior).

Reuse: ``keyed_cache_dir(cfg, root)`` names a cache by what determines its contents (``cache_key``: the SHA-256 of the
first stage's and the text encoder's files and settings, the clip spec, the data shards and the dtype), so a run with
``latents.cache_root`` finds the cache another run on the same data and VAE made and encodes nothing again. Training
reads the posterior mean, or with ``latents.sample`` draws z = mean + exp(logvar / 2) * eps at every step (the VAE's
posterior sampling, without re-encoding).

A cache folder holds, per source shard ``i`` (in ``infra.data`` shard order)::

    part-NNNNNN.safetensors   "<j>/latents" (C, F, h, w) the first stage's normalised posterior mean for the shard's
                              j-th sample and "<j>/latents_logvar" its log-variance (in normalised units; absent when
                              the manifest says "posterior": false), "<j>/text_states" (L, D) and "<j>/text_mask" (L,)
                              of its caption, padding included
    part-NNNNNN.jsonl         line j: {"key", "caption", "meta"} (the source meta line, ground truth included)
    manifest.json             what made the cache (first stage, text encoder, clip shape, source roots)
    COMPLETE                  written last; a cache without it is refused

Batches follow the same plan as ``infra.data.build_loader`` with one video bucket: global batch ``g`` takes the slot
``BucketStream(seed, 0, pool).slot(g, batch_size)``, and rank ``r`` of ``W`` reads ``start + r, start + r + W, ...``. Cached samples keep the source order, so a run
on cached latents sees the samples an on-the-fly run with the same seed sees (when every sample was cached, and the
clips do not depend on the step's random start frame, i.e. clips as long as the videos).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from infra.data.config import weighted_roots
from infra.data.dataset import ClipRequest, load_or_skip
from infra.data.sampling import BucketStream, rank_batches
from infra.data.shard_index import ShardReader, find_shards, index_shards
from infra.data.skips import SkipCounter
from infra.dtypes import DTYPES, torch_dtype
from vae.latent_transform import load_latent_transform

from .runtime import build_first_stage, build_frozen_text_encoder, encode_text

log = logging.getLogger("dit.latent_cache")

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
FIELDS = ("latents", "text_states", "text_mask")
LOGVAR = "latents_logvar"  # present when the manifest's "posterior" is true
VERSION = 2  # 2: posterior log-variances; 1 (mean only) is still read
CACHE_DTYPES = ("float32", "bfloat16")  # what a cache may store its tensors as


def part_name(index: int) -> str:
    return f"part-{index:06d}"


def tensor_name(sample: int, field: str) -> str:
    return f"{sample}/{field}"


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    if not (root / COMPLETE).is_file():
        raise FileNotFoundError(f"latent cache {root} is incomplete or missing (no {COMPLETE} file); "
                                f"run tools.cache_latents (dit.latent_cache.cache_latents) to finish it")
    return json.loads((root / MANIFEST).read_text())


class LatentCache:
    """Random access to the samples of a complete cache, in source order; ``posterior`` also loads each sample's
    log-variance (the cache must hold them)."""

    def __init__(self, root: str | Path, posterior: bool = False):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if posterior and not self.manifest.get("posterior", False):
            raise ValueError(f"latent cache {self.root} holds posterior means only (no log-variances: made through a "
                             f"latent transform, or by an older version); it cannot be sampled")
        self.fields = FIELDS + ((LOGVAR,) if posterior else ())
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
        sample = {f: handle.get_tensor(tensor_name(j, f)) for f in self.fields}
        return {**sample, "caption": line["caption"], "meta": line["meta"]}


def collate(samples: list[dict]) -> dict:
    """Stack samples (text states all have the encoder's max_length: it pads every prompt to it)."""
    stacked = {f: torch.stack([s[f] for s in samples]) for f in (*FIELDS, LOGVAR) if f in samples[0]}
    stacked["text_mask"] = stacked["text_mask"].bool()
    return {**stacked, "caption": [s["caption"] for s in samples], "meta": [s["meta"] for s in samples]}


class LatentBatchDataset(IterableDataset):
    """Endless batches for one rank from global batch ``start_batch`` on; batch ``g`` depends only on (seed, g)."""

    def __init__(self, root: str | Path, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_batch: int = 0, posterior: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        next(rank_batches(start_batch, rank, world_size))  # checks rank and start
        self.cache = LatentCache(root, posterior)
        self.batch_size, self.rank, self.world_size, self.start_batch = batch_size, rank, world_size, start_batch
        # Bucket 0 of the shard loader's plan: the same permutations, hence the same samples per step.
        self.stream = BucketStream(seed, 0, range(len(self.cache)))

    def batch(self, step: int) -> dict:
        indices = self.stream.slot(step, self.batch_size)
        return {**collate([self.cache.load(i) for i in indices]), "kind": "video", "step": step, "skips": {}}

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for mine, step in enumerate(rank_batches(self.start_batch, self.rank, self.world_size)):
            if mine % num_workers == worker:
                yield self.batch(step)


def build_latent_loader(root: str | Path, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                        start_batch: int = 0, num_workers: int = 0, posterior: bool = False) -> DataLoader:
    """The DataLoader for one rank; its ``i``-th batch is global batch ``start_batch + rank + i * world_size`` (with
    the latents' log-variances under ``"latents_logvar"`` when ``posterior``)."""
    dataset = LatentBatchDataset(root, batch_size, rank, world_size, seed, start_batch, posterior)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers)


# ---------------------------------------------------------------------------------------------------- writing
def _manifest(cfg, dtype: str, posterior: bool | None = None) -> dict:
    """What made a cache. ``posterior`` (default: unless a latent transform is set) says whether it holds
    log-variances. ``first_stage.sample`` is left out: a cache holds the posterior, not one draw of it."""
    d = cfg.data
    first_stage = {k: v for k, v in dataclasses.asdict(cfg.first_stage).items() if k != "sample"}
    return {"version": VERSION, "video_roots": d.video_roots, "decoder": d.decoder,
            "clip": {"frames": d.num_frames, "height": d.height, "width": d.width, "fps": d.fps},
            "first_stage": first_stage, "text_encoder": dataclasses.asdict(cfg.text_encoder), "dtype": dtype,
            "posterior": not cfg.first_stage.latent_transform if posterior is None else posterior}


def _fingerprint(folder: str | Path) -> list:
    """(relative name, size, SHA-256) of every file under ``folder``: what a cache's contents depend on, whatever the
    folder is called or wherever it was copied."""
    from infra.assets import sha256_of

    folder = Path(folder)
    if folder.is_file():
        return [[folder.name, folder.stat().st_size, sha256_of(folder)]]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [[str(p.relative_to(folder)), p.stat().st_size, sha256_of(p)] for p in files]


def cache_key(cfg, dtype: str = "float32") -> str:
    """A name for the cache of ``cfg``'s data: the SHA-256 (16 hex digits) of the first stage's files and settings
    (kind, dtype, chunks and tiles, latent transform), the text encoder's files and settings, the clip spec and
    decoder, the data shards (path, size, modification time) and the stored dtype. Runs that agree on all of these
    would write the same cache."""
    import hashlib

    fs, te, d = cfg.first_stage, cfg.text_encoder, cfg.data
    key = {
        "version": VERSION,
        "first_stage": {**{k: v for k, v in dataclasses.asdict(fs).items() if k not in ("path", "sample",
                                                                                       "latent_transform")},
                        "files": _fingerprint(fs.path),
                        "transform": _fingerprint(fs.latent_transform) if fs.latent_transform else None},
        "text_encoder": {**{k: v for k, v in dataclasses.asdict(te).items() if k not in ("path", "tokenizer_path")},
                         "files": _fingerprint(te.model_dir()),
                         "tokenizer": _fingerprint(te.tokenizer_path) if te.tokenizer_path else None},
        "clip": {"frames": d.num_frames, "height": d.height, "width": d.width, "fps": d.fps, "decoder": d.decoder},
        "shards": [[str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns]
                   for p in find_shards(d.video_roots)],
        "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def keyed_cache_dir(cfg, root: str | Path, dtype: str = "float32") -> Path:
    """``<root>/<cache_key>``: where a run with ``latents.cache_root=root`` finds (or makes) its cache."""
    return Path(root) / cache_key(cfg, dtype)


def _check_manifest(out: Path, manifest: dict) -> None:
    path = out / MANIFEST
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != manifest:
            raise ValueError(f"{out} holds a latent cache made with other settings ({existing}); choose another --out")
    else:
        path.write_text(json.dumps(manifest, indent=1) + "\n")


def _write_part(out: Path, index: int, tensors: dict[str, torch.Tensor], lines: list[dict]) -> None:
    stem = out / part_name(index)
    tmp = stem.with_suffix(".safetensors.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, stem.with_suffix(".safetensors"))
    tmp = stem.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, stem.with_suffix(".jsonl"))  # last: its presence marks the part as done


def _part_done(out: Path, index: int) -> bool:
    stem = out / part_name(index)
    return stem.with_suffix(".jsonl").is_file() and stem.with_suffix(".safetensors").is_file()


def cache_latents(cfg, out: str | Path, batch_size: int = 4, dtype: str = "float32",
                  device: torch.device | str | None = None, show_progress: bool = True) -> Path:
    """Write (or finish writing) the latent cache of ``cfg``'s video data into ``out``; returns ``out``."""
    torch_dtype(dtype, "dtype", CACHE_DTYPES)
    weighted = [f"{root}*{w}" for root, w in weighted_roots(cfg.data.video_roots) if w > 1]
    if weighted:  # the cache's loader draws each cached sample once per epoch: a weight would silently not apply
        raise ValueError(f"data.video_roots: the latent cache does not apply root weights ({', '.join(weighted)}); "
                         f"drop the weights, or train on the fly")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(cfg, dtype)
    _check_manifest(out, manifest)
    if (out / COMPLETE).is_file():
        return out
    posterior = manifest["posterior"]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    d = cfg.data
    shards = [str(p) for p in find_shards(d.video_roots)]
    skips, reader = SkipCounter(), ShardReader()
    records = index_shards(d.video_roots, "video", skips)
    todo = [i for i in range(len(shards)) if not _part_done(out, i)]
    first_stage = text_encoder = None
    request = ClipRequest(d.num_frames, d.height, d.width, d.fps)  # first frame, centre crop
    bar = tqdm(total=len(records), desc="cache latents", unit="clip", disable=not show_progress)
    bar.update(sum(1 for r in records if shards.index(r.shard) not in todo))
    for index in todo:
        if first_stage is None:  # built only when there is work left
            first_stage, text_encoder = build_first_stage(cfg, device), build_frozen_text_encoder(cfg, device)
        mine = [r for r in records if r.shard == shards[index]]
        tensors, lines = {}, []
        for start in range(0, len(mine), batch_size):
            videos, captions, metas = [], [], []
            for record in mine[start:start + batch_size]:
                sample = load_or_skip(record, request, reader, d.decoder, skips)
                if sample is None:
                    continue
                for items, item in zip((videos, captions, metas), sample):
                    items.append(item)
            bar.update(len(mine[start:start + batch_size]))
            if not videos:
                continue
            clips = torch.stack(videos).to(device)
            if posterior:
                latents, logvars = (t.float().cpu() for t in first_stage.encode_posterior(clips))
            else:
                latents = first_stage.encode(clips).float().cpu()
            states, mask = encode_text(text_encoder, captions, device)
            for i in range(len(videos)):
                # Text states are kept whole, padding included: a DiT trained as CogVideoX attends to all of them.
                j = len(lines)
                tensors[tensor_name(j, "latents")] = latents[i].to(DTYPES[dtype])
                if posterior:
                    tensors[tensor_name(j, LOGVAR)] = logvars[i].to(DTYPES[dtype])
                tensors[tensor_name(j, "text_states")] = states[i].cpu().to(DTYPES[dtype])
                tensors[tensor_name(j, "text_mask")] = mask[i].cpu()
                lines.append({"key": metas[i]["key"], "caption": captions[i], "meta": metas[i]})
        _write_part(out, index, tensors, lines)
    bar.close()
    reader.close()
    counts = skips.take()
    if counts:
        log.warning("samples skipped while caching (they are not in the cache): %s", counts)
    (out / COMPLETE).write_text(json.dumps({"skips": counts}) + "\n")
    return out


def transform_cache(source: str | Path, out: str | Path, cfg, dtype: str | None = None) -> Path:
    """Re-express a complete cache through ``cfg.first_stage.latent_transform`` without encoding anything again.

    ``source`` must have been made with the same data, text encoder and first stage as ``cfg`` minus the transform;
    every part is rewritten with transformed latents (what encoding through the transformed first stage gives) and
    the same captions, text states and meta. Resumable and idempotent like ``cache_latents``.
    """
    source, out = Path(source), Path(out)
    if not cfg.first_stage.latent_transform:
        raise ValueError("transform_cache: cfg.first_stage.latent_transform names no transform")
    made_with = read_manifest(source)
    if made_with["first_stage"].get("latent_transform"):
        raise ValueError(f"transform_cache: {source} was itself made through a latent transform")
    manifest = _manifest(cfg, dtype or made_with["dtype"])
    untransformed = {**manifest, "first_stage": {**manifest["first_stage"], "latent_transform": ""}}
    # What determines the latents; the format's version and the log-variances do not.
    same = ("video_roots", "decoder", "clip", "text_encoder")
    first_stage = {k: v for k, v in made_with["first_stage"].items() if k != "sample"}
    if ({k: made_with[k] for k in same} != {k: untransformed[k] for k in same}
            or first_stage != untransformed["first_stage"]):
        raise ValueError(f"transform_cache: {source} was made with other settings ({made_with}) than {untransformed}")
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, manifest)
    if (out / COMPLETE).is_file():
        return out
    transform = load_latent_transform(cfg.first_stage.latent_transform)
    parts = sorted(source.glob("part-*.jsonl"))
    for lines_path in parts:
        index = int(lines_path.stem.split("-")[1])
        if _part_done(out, index):
            continue
        lines = [json.loads(line) for line in lines_path.read_text().splitlines()]
        with safe_open(str(lines_path.with_suffix(".safetensors")), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith("/" + LOGVAR)}  # means only
        for j in range(len(lines)):
            key = tensor_name(j, "latents")
            z = tensors[key]
            tensors[key] = transform(z.float()[None])[0].to(DTYPES[manifest["dtype"]])
        _write_part(out, index, tensors, lines)
    (out / COMPLETE).write_text((source / COMPLETE).read_text())
    return out


def write_random_cache(cfg, out: str | Path, num_samples: int, latent_shape: tuple[int, int, int, int],
                       text_embed_dim: int, seed: int = 0) -> Path:
    """A complete cache of ``num_samples`` standard-normal latents ``latent_shape`` (C, F, h, w) and text states
    (max_length, ``text_embed_dim``) with ``cfg``'s manifest, for benchmarks of the DiT training step at sizes whose
    data, VAE or text encoder are not at hand (the engine, the loader and the checks see a real cache)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, _manifest(cfg, "float32", posterior=False))
    generator = torch.Generator().manual_seed(seed)
    length = cfg.text_encoder.max_length
    tensors, lines = {}, []
    for j in range(num_samples):
        tensors[tensor_name(j, "latents")] = torch.randn(latent_shape, generator=generator)
        tensors[tensor_name(j, "text_states")] = torch.randn(length, text_embed_dim, generator=generator)
        tensors[tensor_name(j, "text_mask")] = torch.ones(length, dtype=torch.bool)
        lines.append({"key": f"random{j:06d}", "caption": "", "meta": {}})
    _write_part(out, 0, tensors, lines)
    (out / COMPLETE).write_text(json.dumps({"skips": {}}) + "\n")
    return out
