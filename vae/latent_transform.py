"""Invertible transforms of a first stage's normalised latents: the convergence study's spectral controls.

A control takes one trained VAE and changes only the *shape* of its latent space: the transform is applied after
``encode`` and undone before ``decode``, so the information in the latents and every reconstruction stay the same
(up to float rounding), while the spectrum the diffusion model sees changes. If the paper's claim holds (a latent
spectrum biased to low frequencies and a few channel modes is easier to diffuse), a control that destroys that bias
must converge slower than its source VAE, although it reconstructs exactly as well.

- ``checkerboard``: multiply every channel by a fixed spatial +/-1 checkerboard whose cells are ``cell`` x ``cell``
  latent positions. Orthogonal (its own inverse, exact in floating point): distances, the Gaussian noise and the
  channel eigenspectrum are unchanged, and a smooth field's energy moves to the highest spatial frequencies. A cell
  that equals the DiT's patch size flips whole tokens; a cell of 1 with patch 2 gives every patch the same sign
  pattern, which the patch embedding absorbs exactly (a null control).
- ``whiten``: ZCA whitening of the channels with the covariance of training latents, ``z' = W (z - mu)`` with
  ``W = Sigma^(-1/2)``: the channel eigenspectrum becomes flat (effective rank = channels), positions are mixed only
  across channels, and the forward noise now has the same signal-to-noise ratio in every eigen-direction.

Files: one safetensors file holding the transform's tensors, with ``kind`` and its options in the metadata, so a
run config can name it (``first_stage.latent_transform``) and a latent cache records it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

TRANSFORM_KINDS = ("checkerboard", "whiten")


class LatentTransform(nn.Module):
    """``forward`` maps a first stage's latents (B, C, F, h, w) to the transformed space, ``inverse`` back."""

    kind: str = ""

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def options(self) -> dict:
        """What the file's metadata records besides the kind."""
        return {}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if not tensors:  # safetensors refuses an empty file; keep a marker tensor
            tensors = {"_": torch.zeros(1)}
        metadata = {"kind": self.kind, "options": json.dumps(self.options())}
        save_file(tensors, str(path), metadata=metadata)
        return path


def _check_latent(z: torch.Tensor, what: str) -> None:
    if z.dim() != 5:
        raise ValueError(f"{what}: latents must be (B, C, F, h, w), got shape {tuple(z.shape)}")


class CheckerboardSign(LatentTransform):
    """z * s(h, w) with s = (-1)^(h // cell + w // cell): the same in every channel and frame; its own inverse."""

    kind = "checkerboard"

    def __init__(self, cell: int = 1) -> None:
        super().__init__()
        if cell < 1:
            raise ValueError(f"checkerboard cell must be >= 1 latent position, got {cell}")
        self.cell = int(cell)

    def options(self) -> dict:
        return {"cell": self.cell}

    def signs(self, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
        rows = torch.arange(height, device=device) // self.cell
        cols = torch.arange(width, device=device) // self.cell
        parity = (rows[:, None] + cols[None, :]) % 2
        return (1 - 2 * parity).to(dtype)  # +1, -1

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _check_latent(z, "checkerboard")
        return z * self.signs(z.shape[-2], z.shape[-1], z.device, z.dtype)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return self.forward(z)


class ChannelWhitening(LatentTransform):
    """z' = W (z - mu) over channels at every position, W = Sigma^(-1/2) (ZCA); inverse z = W^-1 z' + mu."""

    kind = "whiten"

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("matrix", torch.eye(channels))
        self.register_buffer("inverse_matrix", torch.eye(channels))

    @classmethod
    def fit(cls, latents: torch.Tensor, eps: float = 1e-6) -> "ChannelWhitening":
        """Mean and covariance of the channel vectors of ``latents`` (N, C, F, h, w) at every position (float64).

        ``eps`` (relative to the mean eigenvalue) keeps near-dead directions invertible.
        """
        _check_latent(latents, "whitening fit")
        channels = latents.shape[1]
        x = latents.detach().to(torch.float64).transpose(0, 1).reshape(channels, -1)
        if x.shape[1] <= channels:
            raise ValueError(f"whitening fit: {x.shape[1]} latent positions cannot estimate a {channels}x{channels} "
                             f"covariance; encode more clips")
        if not torch.isfinite(x).all():
            raise ValueError("whitening fit: latents hold NaN or infinite values")
        mean = x.mean(dim=1)
        centred = x - mean[:, None]
        cov = centred @ centred.T / (x.shape[1] - 1)
        values, vectors = torch.linalg.eigh(cov)
        values = values.clamp_min(eps * values.mean().clamp_min(1e-30))
        out = cls(channels)
        out.mean.copy_(mean.float())
        out.matrix.copy_((vectors @ torch.diag(values.rsqrt()) @ vectors.T).float())
        out.inverse_matrix.copy_((vectors @ torch.diag(values.sqrt()) @ vectors.T).float())
        return out

    def _mix(self, matrix: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("dc,bcfhw->bdfhw", matrix.to(z.dtype), z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _check_latent(z, "whitening")
        return self._mix(self.matrix, z - self.mean.to(z.dtype).view(1, -1, 1, 1, 1))

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        _check_latent(z, "whitening inverse")
        return self._mix(self.inverse_matrix, z) + self.mean.to(z.dtype).view(1, -1, 1, 1, 1)


def load_latent_transform(path: str | Path) -> LatentTransform:
    """Read what ``LatentTransform.save`` wrote; errors name the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent transform {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"latent transform {path} cannot be read: {err}") from None
    kind = metadata.get("kind")
    options = json.loads(metadata.get("options", "{}"))
    if kind == "checkerboard":
        return CheckerboardSign(**options)
    if kind == "whiten":
        if "matrix" not in tensors:
            raise ValueError(f"latent transform {path}: a 'whiten' file needs its 'matrix' tensor")
        out = ChannelWhitening(tensors["matrix"].shape[0])
        out.load_state_dict(tensors)
        return out
    raise ValueError(f"latent transform {path}: unknown kind {kind!r}; known: {TRANSFORM_KINDS}")
