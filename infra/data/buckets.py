"""Which frames a clip contributes, and which bucket (batch shape) each sample belongs to.

Every sample is assigned to exactly one bucket, once, when the loader is built: a video to the bucket nearest its
aspect ratio among those whose frame span it can fill (the longest of equally near ones), an image to the image
bucket nearest its aspect ratio. Fixed assignment is what lets each bucket walk through its own samples in epochs,
each sample once per epoch.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from .config import BucketConfig
from .shard_index import SampleRecord
from .skips import TOO_SHORT, SkipCounter


def frame_offsets(frames: int, source_fps: float, fps: float) -> list[int]:
    """Offsets from the start frame of ``frames`` frames sampled at ``fps`` from a ``source_fps`` clip."""
    step = source_fps / fps
    return [int(math.floor(i * step + 0.5)) for i in range(frames)]


def frame_span(frames: int, source_fps: float, fps: float) -> int:
    """Source frames covered by ``frames`` frames at ``fps`` (first to last, inclusive)."""
    return frame_offsets(frames, source_fps, fps)[-1] + 1


def start_frame(u: float, available: int, span: int) -> int:
    """The start for a uniform draw ``u`` in [0, 1): every start with the span inside the clip is equally likely."""
    return min(int(u * (available - span + 1)), available - span)


def _aspect_distance(aspect: float | None, bucket: BucketConfig) -> float:
    return 0.0 if aspect is None else abs(math.log(aspect / bucket.aspect))


def assign_buckets(records: list[SampleRecord], buckets: list[BucketConfig], fps: float, skips: SkipCounter,
                   aspect_of: Callable[[SampleRecord], float | None] | None = None) -> list[list[int]]:
    """For each bucket, the indices into ``records`` of the samples assigned to it.

    Videos too short for every bucket are skipped as ``too_short``. ``aspect_of`` gives a sample's aspect ratio when
    the meta line lacks it (e.g. by reading an image header); it is only called when there is a choice to make.
    """
    pools: list[list[int]] = [[] for _ in buckets]
    for i, record in enumerate(records):
        if record.kind == "video":
            source_fps = float(record.meta["fps"])
            fitting = [b for b, bucket in enumerate(buckets)
                       if frame_span(bucket.frames, source_fps, fps) <= record.num_frames]
            if not fitting:
                need = frame_span(min(bk.frames for bk in buckets), source_fps, fps)
                skips.skip(TOO_SHORT, f"{record.shard}:{record.key}",
                           f"{record.num_frames} frames, the shortest bucket needs {need}", shard=record.shard)
                continue
        else:
            fitting = list(range(len(buckets)))
        aspect = record.aspect
        if aspect is None and len(fitting) > 1 and aspect_of is not None:
            aspect = aspect_of(record)
        best = min(fitting, key=lambda b: (round(_aspect_distance(aspect, buckets[b]), 6), -buckets[b].frames, b))
        pools[best].append(i)
    return pools
