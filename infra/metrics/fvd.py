"""Frechet Video Distance (Unterthiner et al. 2018): Frechet distance between I3D logits of two clip sets.

Follows the original FVD: 16-frame clips, frames resized to 224x224 with TF1's legacy bilinear resize,
values in [-1, 1], the 400-d Kinetics logits of DeepMind's I3D (``infra.metrics.i3d``) as features, and the
Frechet distance with unbiased covariances. Features of each clip can be cached on disk, keyed by a hash of
the clip's pixels, so the reference set of a study or a reconstruction run is embedded only once.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from infra.metrics.i3d import InceptionI3d

CLIP_FRAMES = 16
RESOLUTION = 224
# Part of every cache key: change it when the features would change (weights, resize, clip length).
FEATURE_VERSION = "i3d-k400-logits-tf1bilinear224-v1"


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two (N, D) feature sets.

    The trace of the matrix root is taken from the eigenvalues of S_a^1/2 S_b S_a^1/2 (symmetric PSD, same
    spectrum as S_a S_b), which avoids the complex round-off of a general ``sqrtm``.
    """
    feats_a, feats_b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    for name, f in (("feats_a", feats_a), ("feats_b", feats_b)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must be (N >= 2, D) to have a covariance, got {f.shape}")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature sizes differ: {feats_a.shape[1]} vs {feats_b.shape[1]}")
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root_a @ cov_b @ root_a
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    distance = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_root
    return max(float(distance), 0.0)  # identical sets give round-off of either sign


def resize_tf1_bilinear(frames: torch.Tensor, size: int = RESOLUTION) -> torch.Tensor:
    """TF1 ``tf.image.resize_bilinear`` (align_corners=False, no half-pixel centres), which the original FVD
    uses: output pixel i samples input coordinate i * in / out, clamped at the last pixel. (N, C, H, W)."""
    n, _, h, w = frames.shape

    def coords(src: int) -> torch.Tensor:
        x = torch.arange(size, dtype=torch.float64) * (src / size)
        return (2 * x / max(src - 1, 1) - 1).to(frames.dtype)  # align_corners=True normalisation

    gy, gx = torch.meshgrid(coords(h), coords(w), indexing="ij")
    grid = torch.stack([gx, gy], -1).expand(n, size, size, 2)
    return F.grid_sample(frames, grid, mode="bilinear", padding_mode="border", align_corners=True)


def preprocess(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> (B, 3, T, 224, 224) for I3D."""
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"FVD expects videos (B, 3, T, H, W) in [-1, 1], got {tuple(video.shape)}")
    b, c, t, h, w = video.shape
    frames = video.transpose(1, 2).reshape(b * t, c, h, w).float()
    if (h, w) != (RESOLUTION, RESOLUTION):
        frames = resize_tf1_bilinear(frames)
    return frames.reshape(b, t, c, RESOLUTION, RESOLUTION).transpose(1, 2)


def split_clips(video: torch.Tensor, frames: int = CLIP_FRAMES, max_clips: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping ``frames``-long windows of one video (3, T, H, W); the remainder is dropped."""
    if video.dim() != 4:
        raise ValueError(f"split_clips expects one video (3, T, H, W), got {tuple(video.shape)}")
    count = video.shape[1] // frames
    if max_clips is not None:
        count = min(count, max_clips)
    return [video[:, i * frames:(i + 1) * frames] for i in range(count)]


def clip_key(clip: torch.Tensor) -> str:
    """Content hash of one clip (3, T, H, W): pixels, shape and feature version."""
    data = clip.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(f"{FEATURE_VERSION}|{tuple(data.shape)}|".encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()


class I3DFeatures:
    """Per-clip I3D logits with an optional on-disk cache (one ``<hash>.npy`` per clip)."""

    def __init__(self, model: InceptionI3d | None = None, cache_dir: str | Path | None = None,
                 batch_size: int = 4, device: str | torch.device = "cpu"):
        self.model = (model if model is not None else InceptionI3d()).to(device).eval()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.computed = 0  # clips actually run through I3D (the rest came from the cache)

    def _cached(self, key: str) -> np.ndarray | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.npy"
        return np.load(path, allow_pickle=False) if path.is_file() else None

    def _store(self, key: str, feat: np.ndarray) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # write then rename: concurrent ranks or an interrupted run never leave a torn file behind
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, feat)
        os.replace(tmp, self.cache_dir / f"{key}.npy")

    @torch.no_grad()
    def __call__(self, clips: Iterable[torch.Tensor]) -> np.ndarray:
        """Features (N, 400) of clips, each (3, 16, H, W) in [-1, 1] (or a batch (N, 3, 16, H, W))."""
        clips = list(clips)
        for clip in clips:
            if clip.dim() != 4 or clip.shape[0] != 3 or clip.shape[1] != CLIP_FRAMES:
                raise ValueError(f"FVD clips must be (3, {CLIP_FRAMES}, H, W), got {tuple(clip.shape)}")
        keys = [clip_key(c) for c in clips]
        feats: list[np.ndarray | None] = [self._cached(k) for k in keys]
        todo = [i for i, f in enumerate(feats) if f is None]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            batch = torch.stack([clips[i] for i in chunk]).to(self.device)
            logits = self.model(preprocess(batch)).double().cpu().numpy()
            for i, feat in zip(chunk, logits):
                feats[i] = feat
                self._store(keys[i], feat)
            self.computed += len(chunk)
        return np.stack(feats) if feats else np.zeros((0, 400))


def fvd(real_clips: Iterable[torch.Tensor], fake_clips: Iterable[torch.Tensor],
        features: I3DFeatures | None = None) -> float:
    """FVD between two sets of 16-frame clips (3, 16, H, W) in [-1, 1]: reconstructions vs originals, or
    generated vs reference clips."""
    features = features if features is not None else I3DFeatures()
    return frechet_distance(features(real_clips), features(fake_clips))
