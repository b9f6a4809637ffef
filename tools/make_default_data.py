"""Write the embedded default data set: procedurally rendered, captioned shape videos and images as shards.

    python -m tools.make_default_data --out data/default --num-videos 256 --num-images 256 \
        --size 128 --frames 33 --fps 8 --seed 0

Videos go to ``video-NNNNNN.tar`` (``mp4`` + ``id`` + ``txt``), images to ``image-NNNNNN.tar`` (``jpg`` + ``id`` +
``txt``), each beside its ``.meta.jsonl`` whose lines carry ``key``, ``width``, ``height``, ``caption``, ``truth`` (the
scene, see ``infra.data.synthetic``) and, for videos, ``fps``, ``duration`` and ``num_frames``.

Every sample is rebuilt from (seed, index) alone, so the tool is idempotent and resumable: shards already written
(both the ``.tar`` and its ``.meta.jsonl``) are skipped, and a finished set (``manifest.json`` matching the arguments)
returns at once. A folder holding a set made with other arguments is refused rather than mixed.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from infra.data.shard_writer import ShardWriter, encode_image
from infra.video_io import encode_mp4
from infra.data.synthetic import SyntheticConfig, make_sample, scene_options

MANIFEST = "manifest.json"


def _shard_done(writer: ShardWriter, index: int) -> bool:
    path = writer.shard_path(index)
    return path.is_file() and path.with_suffix(".meta.jsonl").is_file()


def _write_kind(out: Path, kind: str, count: int, seed: int, cfg: SyntheticConfig, shard_size: int,
                progress: tqdm) -> None:
    video = kind == "video"
    for shard in range((count + shard_size - 1) // shard_size):
        indices = range(shard * shard_size, min((shard + 1) * shard_size, count))
        writer = ShardWriter(out, prefix=f"{kind}-", max_samples=len(indices), start_index=shard)
        if _shard_done(writer, shard):
            progress.update(len(indices))
            continue
        for index in indices:
            frames, text, truth = make_sample(seed, index, cfg, video=video)
            meta = {"width": cfg.width, "height": cfg.height, "caption": text, "truth": truth}
            if video:
                files = {"mp4": encode_mp4(frames, cfg.fps)}
                meta.update(fps=cfg.fps, duration=round(cfg.frames / cfg.fps, 4), num_frames=cfg.frames)
            else:
                files = {"jpg": encode_image(frames[0], "jpg")}
            files["txt"] = text.encode()
            writer.write(f"{kind[0]}{index:07d}", files, meta)
            progress.update(1)
        writer.close()


def make_default_data(out: str | Path, num_videos: int = 256, num_images: int = 256, size: int = 128,
                      frames: int = 33, fps: float = 8.0, seed: int = 0, shard_size: int = 128,
                      show_progress: bool = True, **scene) -> Path:
    """Write (or finish writing) the default set into ``out``; returns the manifest's path.

    ``scene`` sets other ``SyntheticConfig`` fields: shape sizes (``min_radius``, ``max_radius``) and class subsets
    (``shapes``, ``colors``, ``motions``, ``textures``); empty or None values keep the defaults.
    """
    cfg = SyntheticConfig(width=size, height=size, frames=frames, fps=fps, **scene_options(**scene))
    cfg.validate()
    if size % 2:
        raise ValueError(f"size must be even (H.264 yuv420p), got {size}")
    if num_videos < 0 or num_images < 0:
        raise ValueError(f"num_videos and num_images must be >= 0, got {num_videos}, {num_images}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"generator": "infra.data.synthetic", "version": 1, "seed": seed, "num_videos": num_videos,
                "num_images": num_images, "shard_size": shard_size, "config": asdict(cfg)}
    manifest = json.loads(json.dumps(manifest))  # tuples as lists, as a manifest read back has them
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        existing = json.loads(manifest_path.read_text())
        if existing == manifest:
            return manifest_path
        raise ValueError(f"{out} already holds a default set made with other arguments ({existing}); "
                         f"choose another --out")
    with tqdm(total=num_videos + num_images, desc="default data", unit="sample", disable=not show_progress) as bar:
        _write_kind(out, "video", num_videos, seed, cfg, shard_size, bar)
        _write_kind(out, "image", num_images, seed, cfg, shard_size, bar)
    # Written last: its presence means every shard is complete.
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-videos", type=int, default=256)
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--size", type=int, default=128, help="frame width and height in pixels")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=128, help="samples per shard")
    parser.add_argument("--min-radius", type=float, default=None, help="smallest shape radius, fraction of the side")
    parser.add_argument("--max-radius", type=float, default=None, help="largest shape radius, fraction of the side")
    for name in ("shapes", "colors", "motions", "textures"):
        parser.add_argument(f"--{name}", default=None, help=f"comma-separated subset of the {name} (default: all)")
    args = parser.parse_args(argv)
    subsets = {name: getattr(args, name).split(",") if getattr(args, name) else None
               for name in ("shapes", "colors", "motions", "textures")}
    path = make_default_data(args.out, args.num_videos, args.num_images, args.size, args.frames, args.fps, args.seed,
                             args.shard_size, min_radius=args.min_radius, max_radius=args.max_radius, **subsets)
    print(path)


if __name__ == "__main__":
    main()
