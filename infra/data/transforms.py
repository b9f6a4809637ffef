"""Resize-and-crop to the batch shape, and scaling to [-1, 1]."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def crop_box(src_h: int, src_w: int, height: int, width: int, uy: float, ux: float,
             resize: int = 0) -> tuple[int, int, int, int]:
    """The source window (top, left, h, w) that, scaled to fill ``height`` x ``width``, is the crop we want.

    The scale is the smallest that covers the target (resize the short side, crop the long one), or, with ``resize``,
    the one that brings the short side to ``resize`` pixels when that is larger: a ``height`` x ``width`` crop out of
    frames seen at ``resize`` (e.g. 32x32 training crops of 64-pixel frames). ``uy``/``ux`` in [0, 1] place the window
    along each axis: 0.5 is the centre crop, a uniform draw a random crop. Choosing the window in source pixels first
    means only the kept pixels are resized.
    """
    scale = max(height / src_h, width / src_w, resize / min(src_h, src_w))
    h = min(src_h, max(1, int(round(height / scale))))
    w = min(src_w, max(1, int(round(width / scale))))
    top = int(round(uy * (src_h - h)))
    left = int(round(ux * (src_w - w)))
    return top, left, h, w


def frames_to_tensor(frames: np.ndarray, height: int | None = None, width: int | None = None, uy: float = 0.5,
                     ux: float = 0.5, resize: int = 0) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> float (3, T, height, width) in [-1, 1] (the layout and range every model here
    takes), resized to cover (or to a short side of ``resize``) then cropped; ``height``/``width`` None keep the
    frames' own size."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    height = frames.shape[1] if height is None else height
    width = frames.shape[2] if width is None else width
    top, left, h, w = crop_box(frames.shape[1], frames.shape[2], height, width, uy, ux, resize)
    window = frames[:, top:top + h, left:left + w]
    if not (window.flags.c_contiguous and window.flags.writeable):  # PIL hands out read-only arrays
        window = np.array(window)
    x = torch.from_numpy(window).permute(0, 3, 1, 2)
    if (h, w) != (height, width):
        # Anti-aliased bilinear on uint8 has a fast CPU kernel; antialias matters when shrinking 720p to 256.
        x = F.interpolate(x.contiguous(), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.permute(1, 0, 2, 3).float().div_(127.5).sub_(1.0)
