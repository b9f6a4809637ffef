"""Encoding videos (H.264 mp4 in memory) and writing them to disk (reconstructions, samples): tensors in [-1, 1] to
mp4 or png."""
from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch


def encode_mp4(frames: np.ndarray, fps: float, crf: int = 18) -> bytes:
    """Encode uint8 frames (T, H, W, 3) as an H.264 mp4 in memory (PyAV ships libx264)."""
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 with yuv420p needs even height and width, got {h}x{w}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


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
