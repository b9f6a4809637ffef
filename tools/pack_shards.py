"""Pack a folder of mp4 videos (and same-stem .txt captions) into WebDataset shards + meta.jsonl files.

    python -m tools.pack_shards VIDEO_DIR OUT_DIR [--prefix video-] [--max-samples 1000] [--recursive]

Each video's duration, fps, width and height are probed with PyAV (container headers only, no decoding) and written to
the shard's meta file, which is what the loader samples from. Files PyAV cannot open, or without a video stream or
frame rate, are left out and listed; the run ends with a JSON summary on stdout.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from tqdm import tqdm

from infra.data.shard_writer import ShardWriter

logger = logging.getLogger("tools.pack_shards")


def probe_video(path: Path) -> dict:
    """``duration`` (s), ``fps``, ``width``, ``height`` of a video file; raises ``ValueError`` when they are unknowable."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if fps <= 0:
            raise ValueError("no frame rate")
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1e6  # microseconds
        elif stream.frames:
            duration = stream.frames / fps
        else:
            raise ValueError("no duration")
        width, height = stream.codec_context.width, stream.codec_context.height
    return {"duration": round(duration, 4), "fps": round(fps, 4), "width": width, "height": height}


def sample_key(path: Path, root: Path, taken: set[str]) -> str:
    """A WebDataset key (no '.' or '/') from the file's path under ``root``, made unique."""
    stem = path.relative_to(root).with_suffix("").as_posix()
    key = re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "video"
    unique, n = key, 1
    while unique in taken:
        unique, n = f"{key}_{n}", n + 1
    taken.add(unique)
    return unique


def pack_videos(video_dir: str | Path, out_dir: str | Path, prefix: str = "video-", max_samples: int = 1000,
                recursive: bool = False, progress: bool = True) -> dict:
    """Pack every ``.mp4`` in ``video_dir``; returns a summary (shards written, samples, files left out)."""
    root = Path(video_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    videos = sorted(p for p in (root.rglob("*") if recursive else root.iterdir())
                    if p.is_file() and p.suffix.lower() == ".mp4")
    taken: set[str] = set()
    left_out: dict[str, str] = {}
    packed = 0
    with ShardWriter(out_dir, prefix=prefix, max_samples=max_samples) as writer:
        for path in tqdm(videos, desc="packing", unit="video", disable=not progress):
            try:
                meta = probe_video(path)
            except Exception as e:  # PyAV raises its own error types for unreadable files
                left_out[str(path)] = repr(e)
                logger.warning("left out %s: %r", path, e)
                continue
            files = {"mp4": path.read_bytes()}
            caption = path.with_suffix(".txt")
            if caption.is_file():
                files["txt"] = caption.read_text(encoding="utf-8").strip()
            writer.write(sample_key(path, root, taken), files, {**meta, "source": path.name})
            packed += 1
    return {"shards": [str(p) for p in writer.paths], "samples": packed, "left_out": left_out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video_dir", help="folder of .mp4 files (and optional same-stem .txt captions)")
    parser.add_argument("out_dir", help="where the shards and their meta.jsonl files go")
    parser.add_argument("--prefix", default="video-", help="shard name prefix (default: video-)")
    parser.add_argument("--max-samples", type=int, default=1000, help="samples per shard (default: 1000)")
    parser.add_argument("--recursive", action="store_true", help="also pack videos in sub-folders")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.max_samples < 1:
        parser.error("--max-samples must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    summary = pack_videos(args.video_dir, args.out_dir, args.prefix, args.max_samples, args.recursive,
                          progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0 if summary["samples"] else 1


if __name__ == "__main__":
    sys.exit(main())
