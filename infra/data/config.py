"""Configuration of the video/image data pipeline."""
from __future__ import annotations

from dataclasses import dataclass, field

from infra.config import check, join_key

DECODERS = ("decord", "pyav")
CROPS = ("center", "random")


@dataclass
class BucketConfig:
    """One batch shape: ``frames`` x ``height`` x ``width`` with ``batch_size`` samples per rank.

    A bucket with ``frames == 1`` is an image bucket; any other is a video bucket.
    """

    frames: int
    height: int
    width: int
    batch_size: int

    def validate(self, prefix: str = "bucket") -> None:
        check(self.frames >= 1 and (self.frames - 1) % 4 == 0, join_key(prefix, "frames"),
              f"must be 1 + 4k, got {self.frames}")
        for name in ("height", "width", "batch_size"):
            check(getattr(self, name) >= 1, join_key(prefix, name), f"must be >= 1, got {getattr(self, name)}")

    @property
    def aspect(self) -> float:
        return self.width / self.height


@dataclass
class DataConfig:
    """Where the shards are and what batches to cut from them.

    ``video_roots`` and ``image_roots`` are comma-separated lists of shard folders or single ``.tar`` files; video
    samples (``.mp4``) are taken from the first, image samples (``.jpg``/``.png``) from the second, so one folder holding
    both kinds may be named in both. A root written ``path*N`` is sampled N times as often per sample
    (``weighted_roots``; the shard loader only: the latent cache refuses weights).

    Without ``buckets`` every video batch is ``video_batch_size`` x 3 x ``num_frames`` x ``height`` x ``width`` and every
    image batch ``image_batch_size`` x 3 x 1 x ``height`` x ``width``. ``buckets`` replaces these shapes: video samples
    go to the video bucket (``frames > 1``) nearest their aspect ratio among those their duration can fill, images to
    the image bucket (``frames == 1``) nearest theirs; a kind without a bucket of its own keeps the default shape.
    """

    video_roots: str = ""
    image_roots: str = ""
    num_frames: int = 17
    fps: float = 8.0
    height: int = 256
    width: int = 256
    crop: str = "center"
    # Short side (pixels) the frames are resized to before the height x width crop; 0: the smallest size that covers
    # height x width. E.g. resize 64 with height = width = 32 cuts 32x32 crops out of 64-pixel frames, a quarter of
    # the compute per sample for a fully convolutional model that is then used at 64 pixels.
    resize: int = 0
    image_prob: float = 0.125
    image_batch_size: int = 6
    video_batch_size: int = 1
    buckets: list[BucketConfig] = field(default_factory=list)
    num_workers: int = 0
    prefetch_factor: int = 2
    # PyAV is the default: bench/bench_data.py measured it faster than decord for 17 frames at 8 fps from random
    # starts (one seek, then decoding forward; decord pays per jump). Both give bit-identical frames.
    decoder: str = "pyav"

    def __post_init__(self) -> None:
        # YAML gives buckets as plain mappings; accept them so a config file can list buckets inline.
        self.buckets = [b if isinstance(b, BucketConfig) else BucketConfig(**dict(b)) for b in self.buckets]

    def validate(self, prefix: str = "data") -> None:
        def key(name: str) -> str:
            return join_key(prefix, name)

        check(self.num_frames >= 1 and (self.num_frames - 1) % 4 == 0, key("num_frames"),
              f"must be 1 + 4k (1, 5, 9, 13, 17, ...), got {self.num_frames}")
        check(self.fps > 0, key("fps"), f"must be > 0, got {self.fps}")
        for name in ("height", "width", "image_batch_size", "video_batch_size", "prefetch_factor"):
            check(getattr(self, name) >= 1, key(name), f"must be >= 1, got {getattr(self, name)}")
        check(self.resize == 0 or self.resize >= min(self.height, self.width), key("resize"),
              f"must be 0 or at least the crop's short side ({min(self.height, self.width)}), got {self.resize}")
        check(self.num_workers >= 0, key("num_workers"), f"must be >= 0, got {self.num_workers}")
        check(self.crop in CROPS, key("crop"), f"must be one of {CROPS}, got {self.crop!r}")
        check(self.decoder in DECODERS, key("decoder"), f"must be one of {DECODERS}, got {self.decoder!r}")
        check(0.0 <= self.image_prob <= 1.0, key("image_prob"), f"must be in [0, 1], got {self.image_prob}")
        check(self.image_prob == 0 or bool(split_roots(self.image_roots)), key("image_roots"),
              "must name at least one root when image_prob > 0")
        check(self.image_prob == 1 or bool(split_roots(self.video_roots)), key("video_roots"),
              "must name at least one root when image_prob < 1")
        for name in ("video_roots", "image_roots"):
            for root, weight in weighted_roots(getattr(self, name)):
                check(weight >= 1 and bool(root), key(name), f"a root is 'path' or 'path*N' with N >= 1, got "
                                                               f"{root!r} with weight {weight}")
        for i, bucket in enumerate(self.buckets):
            bucket.validate(key(f"buckets[{i}]"))
        shapes = [(b.frames, b.height, b.width) for b in self.buckets]
        check(len(set(shapes)) == len(shapes), key("buckets"), f"must have distinct (frames, height, width), got "
                                                                f"{shapes}")

    def video_buckets(self) -> list[BucketConfig]:
        own = [b for b in self.buckets if b.frames > 1]
        return own or [BucketConfig(self.num_frames, self.height, self.width, self.video_batch_size)]

    def image_buckets(self) -> list[BucketConfig]:
        own = [b for b in self.buckets if b.frames == 1]
        return own or [BucketConfig(1, self.height, self.width, self.image_batch_size)]


def split_roots(roots: str) -> list[str]:
    """``"a, b*3,,c"`` -> ``["a", "b", "c"]``: the roots without their weights."""
    return [root for root, _ in weighted_roots(roots)]


def weighted_roots(roots: str) -> list[tuple[str, int]]:
    """``"a, b*3"`` -> ``[("a", 1), ("b", 3)]``. A root written ``path*N`` lists its samples N times, so each of them
    is drawn N times as often as a sample of an unweighted root: e.g. a few real clips beside a large generated set.
    Only digits after the last ``*`` make a weight; ``DataConfig.validate`` refuses a weight of 0."""
    out = []
    for entry in (r.strip() for r in roots.split(",")):
        path, star, weight = entry.rpartition("*")
        if star and weight.strip().isdigit():
            out.append((path.strip(), int(weight)))
        elif entry:
            out.append((entry, 1))
    return out
