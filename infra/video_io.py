"""Writing videos and frame grids to disk (reconstructions, samples): tensors in [-1, 1] to mp4 or png."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from infra.data.shard_writer import encode_mp4


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video (3, T, H, W), got shape {tuple(video.shape)}")
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def write_video(path: str | Path, video: torch.Tensor, fps: float = 8.0) -> Path:
    """Write a (3, T, H, W) video in [-1, 1] as mp4 (a single frame is written as png)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8_frames(video)
    if frames.shape[0] == 1:
        from PIL import Image

        path = path.with_suffix(".png")
        Image.fromarray(frames[0]).save(path)
        return path
    # H.264 needs even sizes: pad by one pixel where needed rather than refuse.
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path.write_bytes(encode_mp4(frames, fps))
    return path


def side_by_side(*videos: torch.Tensor) -> torch.Tensor:
    """Concatenate (3, T, H, W) videos along width (e.g. original | reconstruction)."""
    return torch.cat([v.detach().float().cpu() for v in videos], dim=-1)
