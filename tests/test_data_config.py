import pytest

from infra.data.config import BucketConfig, DataConfig, split_roots


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"video_roots": "a", "image_roots": "b", **kw})


def test_defaults_follow_the_ssvae_recipe():
    cfg = _cfg()
    cfg.validate()
    assert (cfg.num_frames, cfg.fps, cfg.height, cfg.width) == (17, 8.0, 256, 256)
    assert (cfg.image_batch_size, cfg.video_batch_size, cfg.image_prob) == (6, 1, 0.125)
    assert cfg.video_buckets() == [BucketConfig(17, 256, 256, 1)]
    assert cfg.image_buckets() == [BucketConfig(1, 256, 256, 6)]


@pytest.mark.parametrize("kw, key", [
    ({"num_frames": 16}, "num_frames"),
    ({"num_frames": 0}, "num_frames"),
    ({"fps": 0}, "fps"),
    ({"height": 0}, "height"),
    ({"video_batch_size": 0}, "video_batch_size"),
    ({"num_workers": -1}, "num_workers"),
    ({"crop": "diagonal"}, "crop"),
    ({"decoder": "opencv"}, "decoder"),
    ({"image_prob": 1.5}, "image_prob"),
    ({"image_prob": -0.1}, "image_prob"),
    ({"image_roots": "", "image_prob": 0.5}, "image_roots"),
    ({"video_roots": " , ", "image_prob": 0.5}, "video_roots"),
    ({"buckets": [{"frames": 6, "height": 64, "width": 64, "batch_size": 1}]}, r"buckets\[0\].frames"),
    ({"buckets": [BucketConfig(5, 64, 64, 1), BucketConfig(5, 64, 0, 1)]}, r"buckets\[1\].width"),
    ({"buckets": [BucketConfig(5, 64, 64, 1), BucketConfig(5, 64, 64, 2)]}, "buckets"),
])
def test_validate_names_the_offending_key(kw, key):
    with pytest.raises(ValueError, match=key):
        _cfg(**kw).validate()


def test_only_images_or_only_videos_need_only_their_roots():
    DataConfig(video_roots="v", image_prob=0.0).validate()
    DataConfig(image_roots="i", image_prob=1.0).validate()


def test_buckets_from_mappings_split_by_kind():
    cfg = _cfg(buckets=[{"frames": 9, "height": 64, "width": 96, "batch_size": 2},
                        {"frames": 1, "height": 64, "width": 64, "batch_size": 8}])
    cfg.validate()
    assert cfg.video_buckets() == [BucketConfig(9, 64, 96, 2)]
    assert cfg.image_buckets() == [BucketConfig(1, 64, 64, 8)]


def test_split_roots():
    assert split_roots(" a, b,,c ,") == ["a", "b", "c"]
