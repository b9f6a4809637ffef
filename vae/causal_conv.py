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
    Inputs are fed to the conv channels-last-3d (`channels_last`, a class-wide switch so benchmarks can compare
    layouts); the parameters stay contiguous, as optimizers, ZeRO partitioning and safetensors expect.
    """

    channels_last: bool = True

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

    def _pad_time(self, x: torch.Tensor, front: Optional[torch.Tensor]) -> torch.Tensor:
        """Prepend `front` in time, writing the result channels-last-3d when `channels_last` is on.

        One copy does both: oneDNN (CPU) and cuDNN run these 3D convs about a fifth faster on NDHWC input, and a
        plain `cat` with the broadcast first frame would give a contiguous tensor that the conv copies again.
        """
        if not self.channels_last:
            return x if front is None else torch.cat([front.to(x.dtype), x], dim=2)
        if front is None:
            return x.contiguous(memory_format=torch.channels_last_3d)
        b, c, t, h, w = x.shape
        n = front.shape[2]
        out = torch.empty((b, c, n + t, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
        out[:, :, :n] = front
        out[:, :, n:] = x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pad_time(x, self._front_padding(x))
        if self.streaming:
            # The next output window starts right after the last complete one: keep the frames from there on.
            n_out = max(0, (x.shape[2] - self.kernel_t) // self.stride_t + 1)
            self._context = x[:, :, n_out * self.stride_t :].clone()
        if self.extra_pad is not None:
            x = F.pad(x, self.extra_pad)
        if not self.channels_last:
            return self.conv(x)
        # Some shapes (3 input channels, tiny frames) take a conv path that returns a contiguous tensor: keep the
        # network in one layout, since elementwise ops on mixed layouts (the resnet's x + h) run several times slower.
        return self.conv(x).contiguous(memory_format=torch.channels_last_3d)
