"""The pipeline on the SSVAE authors' example shards (../shared/data/ssvae_example).

Note: the meta file says 1280x720, but the mp4s are 534x300 (same aspect ratio); sizes are read from the frames.
"""
import itertools

import pytest
import torch

from infra.data.config import DataConfig
from infra.data.dataset import build_loader
from infra.data.eval_clips import load_eval_clips
from infra.data.shard_index import find_shards, index_shards
from infra.data.skips import SkipCounter


@pytest.fixture(scope="module")
def example(shared_dir):
    return str(shared_dir / "data" / "ssvae_example")


def test_index_of_the_example_shards(example):
    skips = SkipCounter()
    videos = index_shards(example, "video", skips)
    images = index_shards(example, "image", skips)
    assert skips.counts == {}
    assert len(videos) == 10 and len(images) == 20
    assert all(v.meta["fps"] == 29.97 and v.num_frames >= 72 for v in videos)
    assert {p.name for p in find_shards(example)} == {"video-000000.tar", "image-000000.tar"}
    # a root may also be a single tar, and roots are comma separated
    single = f"{example}/video-000000.tar, {example}/image-000000.tar"
    assert len(index_shards(single, "video", skips)) == 10


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_real_video_batch_17_frames_8fps_256(example, decoder):
    cfg = DataConfig(video_roots=example, image_prob=0.0, decoder=decoder, crop="random")
    batch = next(iter(build_loader(cfg, seed=0)))
    x = batch["video"]
    assert x.shape == (1, 3, 17, 256, 256) and batch["kind"] == "video" and batch["caption"] == [""]
    assert -1 <= x.min() < -0.5 and 0.5 < x.max() <= 1  # real content spans the range
    meta = batch["meta"][0]
    steps = [b - a for a, b in zip(meta["frame_indices"], meta["frame_indices"][1:])]
    assert set(steps) <= {3, 4} and meta["frame_indices"][-1] - meta["frame_indices"][0] == 60  # 16 / 8 s at 29.97


def test_real_image_batch_with_captions(example):
    cfg = DataConfig(image_roots=example, image_prob=1.0, image_batch_size=6, height=128, width=128)
    batch = next(iter(build_loader(cfg, seed=0)))
    assert batch["kind"] == "image" and batch["video"].shape == (6, 3, 1, 128, 128)
    assert all(isinstance(c, str) and c for c in batch["caption"])
    assert -1 <= batch["video"].min() and batch["video"].max() <= 1


def test_eval_clips_are_the_first_clips_and_deterministic(example):
    a = load_eval_clips(example, 2, num_frames=5, height=64, width=64)
    b = load_eval_clips(example, 2, num_frames=5, height=64, width=64, decoder="decord")
    assert a["video"].shape == (2, 3, 5, 64, 64) and a["skips"] == {}
    first_keys = [r.key for r in itertools.islice(index_shards(example, "video", SkipCounter()), 2)]
    assert [m["key"] for m in a["meta"]] == first_keys
    assert all(m["start_frame"] == 0 for m in a["meta"])
    assert torch.equal(a["video"], b["video"])  # same pixels whatever the decoder
