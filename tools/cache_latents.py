"""Encode a shard data set once with the frozen first stage and text encoder, into a latent cache for DiT training.

    python -m tools.cache_latents --config configs/t2v/tiny.yaml --out data/latents/tiny [key=value ...]
    python -m dit.train --config configs/t2v/tiny.yaml latents.cache_dir=data/latents/tiny

The run config names everything: the videos (``data.video_roots``), the clip cut from each (``data.num_frames`` at
``data.fps``, ``data.height`` x ``data.width``, from the first frame, centre crop), the first stage (its ``encode``
normalises latents by the VAE's statistics) and the text encoder. Layout: see ``dit.latent_dataset``. Each source
shard becomes one part, written atomically; parts already written are skipped, so an interrupted run resumes where it
stopped. A folder holding a cache made with other settings is refused rather than mixed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dit.latent_dataset import COMPLETE, MANIFEST, part_name, read_manifest, tensor_name
from infra.config import load_config
from infra.data.dataset import ClipRequest, load_or_skip
from infra.data.shard_index import ShardReader, find_shards, index_shards
from infra.data.skips import SkipCounter
from vae.latent_transform import load_latent_transform

log = logging.getLogger("tools.cache_latents")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}



def _manifest(cfg, dtype: str) -> dict:
    d = cfg.data
    return {"version": 1, "video_roots": d.video_roots, "decoder": d.decoder,
            "clip": {"frames": d.num_frames, "height": d.height, "width": d.width, "fps": d.fps},
            "first_stage": dataclasses.asdict(cfg.first_stage), "text_encoder": dataclasses.asdict(cfg.text_encoder),
            "dtype": dtype}


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
    from dit.train import build_first_stage, build_frozen_text_encoder, encode_text

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, _manifest(cfg, dtype))
    if (out / COMPLETE).is_file():
        return out
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
            latents = first_stage.encode(torch.stack(videos).to(device)).float().cpu()
            states, mask = encode_text(text_encoder, captions, device)
            for i in range(len(videos)):
                # Text states are kept whole, padding included: a DiT trained as CogVideoX attends to all of them.
                j = len(lines)
                tensors[tensor_name(j, "latents")] = latents[i].to(DTYPES[dtype])
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
    if {k: v for k, v in made_with.items() if k != "dtype"} != {k: v for k, v in untransformed.items() if k != "dtype"}:
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
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for j in range(len(lines)):
            key = tensor_name(j, "latents")
            z = tensors[key]
            tensors[key] = transform(z.float()[None])[0].to(DTYPES[manifest["dtype"]])
        _write_part(out, index, tensors, lines)
    (out / COMPLETE).write_text((source / COMPLETE).read_text())
    return out


def main(argv: list[str] | None = None) -> Path:
    from dit.train_config import T2VTrainConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the t2v run YAML (data, first_stage, text_encoder)")
    parser.add_argument("--out", required=True, help="cache folder")
    parser.add_argument("--batch-size", type=int, default=4, help="clips encoded together")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="stored tensor dtype")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML")
    args = parser.parse_args(argv)
    cfg = load_config(T2VTrainConfig, args.config, args.overrides)
    out = cache_latents(cfg, args.out, args.batch_size, args.dtype)
    print(out)
    return out


if __name__ == "__main__":
    main()
