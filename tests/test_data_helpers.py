"""Tiny shards for the data-pipeline tests (no tests here).

Video frame ``i`` is a flat grey of level ``LEVEL0 + LEVEL_STEP * i`` plus a faint horizontal ramp, so a decoded
frame's mean tells which source frame it was (H.264 at crf 18 keeps flat levels within ~1).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from infra.data.shard_writer import ShardWriter, encode_image
from infra.video_io import encode_mp4

LEVEL0, LEVEL_STEP = 16, 6


def level_frames(num_frames: int, size: int = 64) -> np.ndarray:
    levels = LEVEL0 + LEVEL_STEP * np.arange(num_frames)
    ramp = np.linspace(0, 8, size)[None, None, :, None]
    frames = levels[:, None, None, None] + ramp + np.zeros((1, size, 1, 3))
    return np.clip(frames, 0, 255).astype(np.uint8)


def frame_index_of(frame_minus1_to_1, size_ramp: float = 4.0) -> int:
    """Source frame index from a decoded frame in [-1, 1] (any crop of a ``level_frames`` frame)."""
    mean = (float(frame_minus1_to_1.mean()) + 1) * 127.5 - size_ramp
    return int(round((mean - LEVEL0) / LEVEL_STEP))


def video_entry(num_frames: int, fps: float, size: int = 64) -> tuple[bytes, dict]:
    data = encode_mp4(level_frames(num_frames, size), fps)
    return data, {"duration": num_frames / fps, "fps": fps, "width": size, "height": size}


def write_video_shards(out: Path, num_samples: int, num_frames: int = 24, fps: float = 24.0, per_shard: int = 4,
                       prefix: str = "video-", caption: bool = True) -> Path:
    """``num_samples`` clips in shards of ``per_shard``; the clips share one encoding (only bytes matter)."""
    data, meta = video_entry(num_frames, fps)
    with ShardWriter(out, prefix=prefix, max_samples=per_shard) as writer:
        for i in range(num_samples):
            files = {"mp4": data}
            if caption:
                files["txt"] = f"clip number {i}"
            writer.write(f"v{i:04d}", files, {**meta, "truth": {"index": i}})
    return out


def write_image_shards(out: Path, num_samples: int, sizes=((48, 64),), per_shard: int = 8,
                       prefix: str = "image-") -> Path:
    rng = np.random.default_rng(0)
    with ShardWriter(out, prefix=prefix, max_samples=per_shard) as writer:
        for i in range(num_samples):
            h, w = sizes[i % len(sizes)]
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            writer.write(f"i{i:04d}", {"jpg": encode_image(image), "txt": f"image number {i}"},
                         {"width": w, "height": h})
    return out


def batch_keys(batch) -> list[str]:
    return [m["key"] for m in batch["meta"]]
