import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from infra.video_io import encode_mp4
from infra.data.synthetic import SyntheticConfig, make_sample
from tools.caption_reward import chance_level, classify_motion, main, read_video, recover, score_batch, score_video

CFG = SyntheticConfig(width=64, height=64, frames=17, fps=8)
NUM = 16


@pytest.fixture(scope="module")
def clips():
    """Rendered clips after an H.264 round trip, with their truths."""
    samples = [make_sample(11, i, CFG) for i in range(NUM)]
    return [read_video(encode_mp4(frames, CFG.fps)) for frames, _, _ in samples], [t for _, _, t in samples]


def test_real_clips_score_near_one_and_shuffled_truths_near_chance(clips):
    videos, truths = clips
    result = score_batch(videos, truths)
    assert result["count"] == NUM
    assert result["mean"]["total"] >= 0.9, result["mean"]
    # Every clip is checked on all three attributes.
    assert all(s["motion"] is not None for s in result["per_video"])

    # Rotating the truths by one is a derangement: no clip keeps its own caption.
    shuffled = score_batch(videos, truths[1:] + truths[:1])
    chance = shuffled["chance"]
    # Uniform draws over 5 shapes, 8 colours, 11 motions: chance about (0.2 + 0.125 + 0.09) / 3 = 0.14.
    assert chance["total"] < 0.3
    assert shuffled["mean"]["total"] < 0.45 and shuffled["mean"]["total"] < result["mean"]["total"] - 0.5


def test_degrades_gracefully_with_blur_and_noise(clips):
    videos, truths = clips
    rng = np.random.default_rng(0)

    def degrade(video, sigma, noise):
        x = ndimage.gaussian_filter(video.astype(np.float32) / 255, (0, sigma, sigma, 0))
        return (np.clip(x + rng.normal(0, noise, x.shape), 0, 1) * 255).astype(np.uint8)

    mild = score_batch([degrade(v, 1.0, 0.03) for v in videos[:8]], truths[:8])["mean"]["total"]
    heavy = score_batch([degrade(v, 3.0, 0.15) for v in videos[:8]], truths[:8])["mean"]["total"]
    assert mild >= 0.85
    assert 0.3 <= heavy <= mild + 1e-9


def test_float_tensor_input_matches_uint8(clips):
    videos, truths = clips
    tensor = torch.from_numpy(videos[0]).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # (3, T, H, W) in [-1, 1]
    assert score_video(tensor, truths[0]) == score_video(videos[0], truths[0])
    batch = torch.stack([tensor, tensor])  # iterating a (B, 3, T, H, W) tensor gives clips
    assert score_batch(batch, [truths[0]] * 2)["mean"] == score_batch([videos[0]] * 2, [truths[0]] * 2)["mean"]


def test_empty_and_noise_clips_score_low_without_failing(clips):
    _, truths = clips
    flat = np.full((9, 64, 64, 3), 90, dtype=np.uint8)
    empty = score_video(flat, truths[0])
    assert empty["total"] == 0.0 and empty["pred"] == {"shape": None, "color": None, "motion": None}
    noise = np.random.default_rng(1).integers(0, 256, (5, 9, 64, 64, 3), dtype=np.uint8)
    result = score_batch(list(noise), truths[:5])
    assert 0.0 <= result["mean"]["total"] <= 0.5


def test_images_are_scored_on_shape_and_colour():
    frames, _, truth = make_sample(3, 0, CFG, video=False)
    score = score_video(frames[0], truth)  # (H, W, 3) is one frame
    assert score["motion"] is None and score["total"] == pytest.approx((score["shape"] + score["color"]) / 2)
    assert score["total"] == 1.0


def test_classify_motion_directions_and_scale():
    t = np.linspace(0, 1, 9)
    flat = np.ones(9)
    assert classify_motion(np.stack([0.2 + 0.4 * t, 0.5 + 0 * t], 1), flat, t) == "right"
    assert classify_motion(np.stack([0.7 - 0.3 * t, 0.7 - 0.3 * t], 1), flat, t) == "up-left"
    still = np.stack([0.5 + 0.01 * t, 0.5 + 0 * t], 1)
    assert classify_motion(still, flat, t) == "still"
    assert classify_motion(still, np.exp(1.4 * t), t) == "grow"
    assert classify_motion(still, np.exp(-1.4 * t), t) == "shrink"


def test_chance_level_is_sum_of_squared_frequencies():
    truths = [{"shape": s, "color": "red", "motion": None} for s in ("circle", "circle", "square", "star")]
    chance = chance_level(truths)
    assert chance["shape"] == pytest.approx(0.25 + 0.0625 + 0.0625) and chance["color"] == 1.0
    assert chance["motion"] is None and chance["total"] == pytest.approx((0.375 + 1.0) / 2)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="float video"):
        recover(np.zeros((4, 3, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        recover(np.zeros((4, 8, 8, 4), dtype=np.uint8))


def test_cli_scores_a_folder_against_a_meta_file(tmp_path, clips, capsys):
    videos, truths = clips
    folder = tmp_path / "videos"
    folder.mkdir()
    with open(tmp_path / "x.meta.jsonl", "w") as meta:
        for i in range(3):
            (folder / f"k{i}.mp4").write_bytes(encode_mp4(videos[i], CFG.fps))
            meta.write(json.dumps({"key": f"k{i}", "truth": truths[i]}) + "\n")
    (folder / "stray.mp4").write_bytes(encode_mp4(videos[3], CFG.fps))
    main(["--videos", str(folder), "--meta", str(tmp_path / "x.meta.jsonl"), "--out", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["count"] == 3 and result["videos_without_truth"] == 1
    assert [v["key"] for v in result["per_video"]] == ["k0", "k1", "k2"]
    assert result["mean"]["total"] >= 0.6
