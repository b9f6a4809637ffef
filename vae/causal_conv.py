"""Causal 3D convolution, and the streaming state that lets a causal network run over a video chunk by chunk.

A causal conv pads time only in front, so output frame t sees input frames <= t. When a long video is cut into
temporal chunks, the frames that one chunk's convolution needs from before its start are exactly the last
`kernel_t - stride_t` (padded) input frames of the previous chunk. `CausalConv3d` keeps them as its *context*
while streaming is on (see `vae.inference.causal_streaming`), so chunked and whole-video passes agree.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

TIME_PAD_MODES = ("first", "constant")


class Streamable(nn.Module):
    """A module that, while `streaming` is on, carries state from one temporal chunk to the next."""

    def __init__(self) -> None:
        super().__init__()
        self.streaming = False

    def reset_stream(self) -> None:
        """Forget what earlier chunks left behind (the next chunk is treated as the video's start)."""
        raise NotImplementedError


class StreamStart(Streamable):
    """Base for parameter-free layers that only need to know whether a chunk is the video's first one."""

    def __init__(self) -> None:
        super().__init__()
        self._started = False

    def reset_stream(self) -> None:
        self._started = False

    def is_video_start(self) -> bool:
        """True for a whole video and for the first chunk of a stream; marks the stream as started."""
        first = not (self.streaming and self._started)
        if self.streaming:
            self._started = True
        return first


class CausalConv3d(Streamable):
    """Conv3d padded causally in time (kernel_t - 1 frames in front) and as given in height and width.

    Height/width padding goes through the conv's own `padding` when symmetric (no padded copy of the input);
    `spatial_padding=(left, right, top, bottom)` that is asymmetric is applied with F.pad.
    Time padding repeats the first frame ('first', the released model) or prepends zeros ('constant').
    Parameters live under `conv.weight` / `conv.bias` as in the released checkpoint.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        time_pad_mode: str = "first",
        spatial_padding: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        if time_pad_mode not in TIME_PAD_MODES:
            raise ValueError(f"time_pad_mode must be one of {TIME_PAD_MODES}, got {time_pad_mode!r}")
        if spatial_padding is None:
            spatial_padding = (kw // 2, kw // 2, kh // 2, kh // 2)
        left, right, top, bottom = spatial_padding
        symmetric = left == right and top == bottom
        self.kernel_t, self.stride_t = kt, stride[0]
        self.time_pad_mode = time_pad_mode
        self.extra_pad = None if symmetric else (left, right, top, bottom)
        conv_padding = (0, top, left) if symmetric else 0
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), stride=stride, padding=conv_padding)
        self._context: Optional[torch.Tensor] = None

    def reset_stream(self) -> None:
        self._context = None

    def _front_padding(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.streaming and self._context is not None:
            return self._context
        n = self.kernel_t - 1
        if n == 0:
            return None
        if self.time_pad_mode == "first":
            return x[:, :, :1].expand(-1, -1, n, -1, -1)
        return x.new_zeros(x.shape[0], x.shape[1], n, *x.shape[3:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        front = self._front_padding(x)
        if front is not None:
            x = torch.cat([front.to(x.dtype), x], dim=2)
        if self.streaming:
            # The next output window starts right after the last complete one: keep the frames from there on.
            n_out = max(0, (x.shape[2] - self.kernel_t) // self.stride_t + 1)
            self._context = x[:, :, n_out * self.stride_t :].clone()
        if self.extra_pad is not None:
            x = F.pad(x, self.extra_pad)
        return self.conv(x)
