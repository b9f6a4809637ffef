"""tools/latent_stats CLI: measured stats, stored with a tiny random SSVAE, make its latents zero-mean unit-std."""

import json

import numpy as np
import pytest
import torch

from infra.data.shard_writer import ShardWriter
from infra.video_io import encode_mp4
from tools.latent_stats import STATS_NAME, latent_statistics, main, raw_latents
from tools.reconstruct import ClipSpec, FrameGeometry, iter_clips, tiny_random_ssvae
from vae.first_stage import FirstStageConfig, SSVAEFirstStage, load_first_stage
from vae.model import SSVAE

FRAMES, SIZE, FPS = 5, 32, 8.0


@pytest.fixture
def shard(tmp_path):
    """Four short clips of drifting colour gradients (different per clip) in one shard."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    with ShardWriter(tmp_path / "data", prefix="video-") as writer:
        for n in range(4):
            rgb = np.stack([np.sin(3 * xx + n), np.cos(2 * yy - n), xx * yy], -1)
            frames = [np.clip(127 + 120 * np.roll(rgb, 2 * t, axis=1) * (1 - 0.3 * n), 0, 255) for t in range(7)]
            mp4 = encode_mp4(np.stack(frames).astype(np.uint8), FPS)
            writer.write(f"clip{n}", {"mp4": mp4}, {"fps": FPS, "duration": 7 / FPS, "width": SIZE, "height": SIZE})
    return tmp_path / "data"


def _normalised_stats(folder, shard) -> dict:
    stage = load_first_stage(FirstStageConfig(kind="ssvae", path=str(folder)))
    spec = ClipSpec(num_frames=FRAMES, fps=FPS, height=SIZE, width=SIZE)
    latents = torch.cat([stage.encode(c.video[None]) for c in iter_clips([shard], spec, FrameGeometry.of(stage))])
    return latent_statistics(latents)


def test_stored_stats_normalise_the_latents(tmp_path, shard):
    folder = tmp_path / "vae"
    tiny_random_ssvae(seed=3).save_pretrained(folder)
    before = _normalised_stats(folder, shard)
    # The random model's raw latents are not already standard: the test below could fail.
    assert max(abs(m) for m in before["mean"]) > 0.02 or max(abs(s - 1) for s in before["std"]) > 0.1

    out_json = tmp_path / "stats.json"
    stats = main([str(shard), "--vae-folder", str(folder), "--num-clips", "10", "--num-frames", str(FRAMES),
                  "--fps", str(FPS), "--size", str(SIZE), "--store", "--json", str(out_json)])
    assert stats["num_clips"] == 4 and stats["channels"] == 8 and len(stats["std"]) == 8
    assert stats["overall_std"] > 0 and stats["mean_abs_channel_mean"] == pytest.approx(np.abs(stats["mean"]).mean())
    written = json.loads(out_json.read_text())
    assert written["mean"] == stats["mean"] and json.loads((folder / STATS_NAME).read_text())["std"] == stats["std"]
    model = SSVAE.from_pretrained(folder)
    torch.testing.assert_close(model.latent_mean.flatten(), torch.tensor(stats["mean"]))

    after = _normalised_stats(folder, shard)
    np.testing.assert_allclose(after["mean"], 0.0, atol=1e-4)
    np.testing.assert_allclose(after["std"], 1.0, atol=1e-4)


def test_raw_latents_undo_the_normalisation_and_refuse_sampling():
    model = tiny_random_ssvae()
    model.set_latent_stats(torch.linspace(-1, 1, 8), torch.linspace(0.5, 2, 8))
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = model.posterior(x).mode()
    torch.testing.assert_close(raw_latents(SSVAEFirstStage(model), x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="posterior mean"):
        raw_latents(SSVAEFirstStage(model, sample=True), x)


def test_store_needs_an_ssvae_folder(tmp_path, shard):
    with pytest.raises(SystemExit):
        main([str(shard), "--random-tiny", "--store", "--num-frames", str(FRAMES), "--size", str(SIZE)])
    saved = tmp_path / "tiny"
    main([str(shard), "--random-tiny", "--store", "--save-to", str(saved), "--num-clips", "2",
          "--num-frames", str(FRAMES), "--fps", str(FPS), "--size", str(SIZE)])
    assert json.loads((saved / STATS_NAME).read_text())["num_clips"] == 2
    assert SSVAE.from_pretrained(saved).latent_std.flatten().tolist() != [1.0] * 8
