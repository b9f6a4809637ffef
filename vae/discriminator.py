"""SSVAE's image-and-video PatchGAN discriminator and its hinge losses.

Two branches judge every input (B, 3, T, H, W), images (T = 1) included, as in the released recipe:
- ``patchgan_2d``: a spectral-norm PatchGAN (4x4 convs) applied to each frame on its own, for per-frame realism;
- ``patchgan_3d``: a causal 3D PatchGAN whose first log2(max_temporal_down) layers are stride-2 causal 3D convs
  (time padded in front by repeating the first frame, so an image is a valid 1-frame video) and whose remaining
  down-samplings are frame-wise 2D convs, then two causal 3D convs; it judges motion.
Each branch down-samples space by ``max_spatial_down``; logits are patch maps (B, 1, T', h, w). Module names follow
the reference implementation (zai-org/SSVAE ``PatchGANImageVideoDisc``) so its ``loss.discriminator.*`` weights map
one to one; spectral norm uses torch.nn.utils.spectral_norm (keys ``weight_orig/_u/_v``) for the same reason.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import spectral_norm

LEAKY_SLOPE = 0.2


@dataclass
class DiscriminatorConfig:
    """Released: ndf 64, spatial down 16, temporal down 4 (tests use tiny values)."""

    in_channels: int = 3
    ndf: int = 64
    max_spatial_down: int = 16
    max_temporal_down: int = 4

    def validate(self, prefix: str = "discriminator") -> None:
        for key in ("in_channels", "ndf"):
            if getattr(self, key) < 1:
                raise ValueError(f"{prefix}.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("max_spatial_down", "max_temporal_down"):
            value = getattr(self, key)
            if value < 2 or value & (value - 1):
                raise ValueError(f"{prefix}.{key}: must be a power of 2 >= 2, got {value}")
        if self.max_temporal_down > self.max_spatial_down:
            raise ValueError(f"{prefix}.max_temporal_down: temporal down-sampling layers also down-sample space, so "
                             f"it must be <= max_spatial_down ({self.max_spatial_down}), got {self.max_temporal_down}")

    @property
    def num_down_layers(self) -> int:
        return int(math.log2(self.max_spatial_down))

    def channels(self, layer: int) -> int:
        """Output width of down-sampling layer ``layer`` (0-based); the reference caps the multiplier at 16."""
        return self.ndf * min(2 ** layer, 16)

    @property
    def head_channels(self) -> int:
        """Width of the first conv after the down-sampling layers (the reference caps this multiplier at 8)."""
        return self.ndf * min(2 ** self.num_down_layers, 8)


def _init_conv(conv: nn.Module) -> nn.Module:
    """DCGAN/VQGAN initialisation (before spectral norm wraps the weight)."""
    nn.init.normal_(conv.weight, 0.0, 0.02)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _sn_conv2d(c_in: int, c_out: int, kernel: int, stride: int, padding: int, bias: bool) -> nn.Module:
    return spectral_norm(_init_conv(nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=bias)))


def _leaky() -> nn.Module:
    return nn.LeakyReLU(LEAKY_SLOPE, inplace=True)


def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _batch_to_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
    bt, c, h, w = x.shape
    return x.reshape(batch, bt // batch, c, h, w).transpose(1, 2)


class CausalConv3d(nn.Module):
    """Spectral-norm Conv3d (kernel 3) padded causally in time by repeating the first frame.

    ``stride`` 2 halves T (as ceil(T / 2): 17 -> 9 -> 5, 1 -> 1) and H, W; space is then padded only at the
    right/bottom so an even size halves exactly. ``stride`` 1 pads space symmetrically.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, bias: bool = True):
        super().__init__()
        self.time_pad = 2
        self.space_pad = (0, 1, 0, 1) if stride == 2 else (1, 1, 1, 1)
        self.conv = spectral_norm(_init_conv(nn.Conv3d(c_in, c_out, 3, stride=stride, bias=bias)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1), x], dim=2)
        return self.conv(F.pad(x, self.space_pad))


class PatchGAN2D(nn.Module):
    """Frame-wise spectral-norm PatchGAN: (B, C, T, H, W) -> (B, 1, T, H/down - 2, W/down - 2)."""

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        n = config.num_down_layers
        self.input_layer = nn.Sequential(_sn_conv2d(config.in_channels, config.channels(0), 4, 2, 1, True), _leaky())
        self.blocks = nn.ModuleList(
            nn.Sequential(_sn_conv2d(config.channels(i - 1), config.channels(i), 4, 2, 1, False), _leaky())
            for i in range(1, n))
        self.out_layer = nn.Sequential(
            _sn_conv2d(config.channels(n - 1), config.head_channels, 4, 1, 1, False), _leaky(),
            # The logit conv is not spectral-normalised (as in the reference).
            _init_conv(nn.Conv2d(config.head_channels, 1, 4, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layer(_frames_to_batch(x))
        for block in self.blocks:
            h = block(h)
        return _batch_to_frames(self.out_layer(h), x.shape[0])


class CausalPatchGAN3D(nn.Module):
    """Causal 3D PatchGAN: (B, C, T, H, W) -> (B, 1, T', H/down, W/down) with T' = T shrunk by ceil-halving
    log2(max_temporal_down) times. Output frame j depends only on input frames up to its own time span."""

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        n = config.num_down_layers
        self.num_temporal_layers = int(math.log2(config.max_temporal_down))
        self.conv_in = nn.Sequential(CausalConv3d(config.in_channels, config.channels(0), stride=2), _leaky())
        blocks = []
        for i in range(1, n):
            if i < self.num_temporal_layers:
                conv = CausalConv3d(config.channels(i - 1), config.channels(i), stride=2, bias=False)
            else:
                conv = _sn_conv2d(config.channels(i - 1), config.channels(i), 3, 2, 1, False)
            blocks.append(nn.Sequential(conv, _leaky()))
        self.down_blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(CausalConv3d(config.channels(n - 1), config.head_channels, bias=False), _leaky(),
                                 CausalConv3d(config.head_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        h = self.conv_in(x)
        for i, block in enumerate(self.down_blocks, start=1):
            if i == self.num_temporal_layers:  # from here on, space-only down-sampling frame by frame
                h = _frames_to_batch(h)
            h = block(h)
        if h.dim() == 4:
            h = _batch_to_frames(h, batch)
        return self.out(h)


class ImageVideoDiscriminator(nn.Module):
    """Both PatchGANs on the same input; returns (frame logits, video logits)."""

    def __init__(self, config: DiscriminatorConfig | None = None):
        super().__init__()
        self.config = config or DiscriminatorConfig()
        self.config.validate()
        self.patchgan_2d = PatchGAN2D(self.config)
        self.patchgan_3d = CausalPatchGAN3D(self.config)
        # The spectral-norm layers (torch.nn.utils.spectral_norm keeps weight_u / weight_v buffers), found once.
        self._spectral_layers = [m for m in self.modules() if hasattr(m, "weight_u")]
        self.power_iteration_per_step = False

    def train(self, mode: bool = True) -> "ImageVideoDiscriminator":
        super().train(mode)
        if self.power_iteration_per_step:  # the layers' own flag is what makes spectral norm iterate in a forward
            for layer in self._spectral_layers:
                layer.train(False)
        return self

    def iterate_per_step(self) -> "ImageVideoDiscriminator":
        """Run spectral norm's power iteration only when ``power_iteration()`` is called, not in every training
        forward (torch's and the reference's default). Data-parallel training wants this: a per-forward iteration
        makes the u/v buffers depend on how many forwards each rank ran, so ranks drift apart and a run on W ranks
        differs from the same global batches on 1 rank with accumulation (measured: 2.5e-4 on the first
        discriminator loss). Once per optimizer step, on weights every rank shares, keeps them equal."""
        self.power_iteration_per_step = True
        return self.train(self.training)

    @torch.no_grad()
    def power_iteration(self) -> None:
        """One power iteration of every spectral-norm layer on its current weights (updates u and v in place)."""
        from torch.nn.utils.spectral_norm import SpectralNorm

        for layer in self._spectral_layers:
            for hook in layer._forward_pre_hooks.values():
                if isinstance(hook, SpectralNorm):
                    hook.compute_weight(layer, do_power_iteration=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"discriminator: expected (B, {self.config.in_channels}, T, H, W), "
                             f"got shape {tuple(x.shape)}")
        min_size = 3 * self.config.max_spatial_down  # the 2D head's two 4x4 convs shrink its map by 2
        if min(x.shape[-2:]) < min_size:
            raise ValueError(f"discriminator: frames must be at least {min_size}x{min_size} for max_spatial_down "
                             f"{self.config.max_spatial_down}, got {tuple(x.shape[-2:])}")
        dtype = self.patchgan_2d.out_layer[-1].weight.dtype
        self._spectral_vectors_to(dtype)
        x = x.to(dtype)  # e.g. bf16 reconstructions, fp32 discriminator
        return self.patchgan_2d(x), self.patchgan_3d(x)

    def _spectral_vectors_to(self, dtype: torch.dtype) -> None:
        # Mixed precision (DeepSpeed's bf16) casts parameters but keeps buffers fp32, and spectral norm's power
        # iteration multiplies each weight with its u/v buffers, which must share its dtype (CPU autocast leaves
        # that product alone). They are cast together, so the first one tells whether anything is left to do.
        if not self._spectral_layers or self._spectral_layers[0].weight_u.dtype == dtype:
            return
        for layer in self._spectral_layers:
            layer.weight_u.data = layer.weight_u.data.to(dtype)
            layer.weight_v.data = layer.weight_v.data.to(dtype)


def hinge_discriminator_loss(logits_real: Sequence[torch.Tensor], logits_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """Hinge loss 0.5 * (mean relu(1 - real) + mean relu(1 + fake)), averaged over the discriminator's branches."""
    losses = [0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
              for real, fake in zip(logits_real, logits_fake, strict=True)]
    return torch.stack(losses).mean()


def hinge_generator_loss(logits_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """Generator side of the hinge GAN: -mean(fake logits), averaged over the discriminator's branches."""
    return torch.stack([-fake.mean() for fake in logits_fake]).mean()
