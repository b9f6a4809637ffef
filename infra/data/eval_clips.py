"""Held-out clips for periodic reconstruction during training: always the same pixels.

The first ``n`` usable clips of the roots, in shard and tar order, each from its first frame and centre-cropped; no
randomness anywhere, so reconstructions at different steps (or runs) compare like with like.
"""
from __future__ import annotations

import logging

import torch

from .buckets import frame_span
from .dataset import ClipRequest, load_or_skip
from .shard_index import ShardReader, index_shards
from .skips import TOO_SHORT, SkipCounter

logger = logging.getLogger("infra.data")


def load_eval_clips(roots: str, n: int, num_frames: int = 17, fps: float = 8.0, height: int = 256, width: int = 256,
                    decoder: str = "pyav") -> dict:
    """A batch dict (as the loader's, ``kind`` "video") of the first ``n`` usable clips; fewer if the roots hold fewer.

    Clips that are bad or too short are skipped and counted in ``skips``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    skips, reader = SkipCounter(), ShardReader()
    request = ClipRequest(num_frames, height, width, fps)  # u_start 0, centre crop
    videos, captions, metas = [], [], []
    for record in index_shards(roots, "video", skips):
        if len(videos) == n:
            break
        if record.num_frames < frame_span(num_frames, float(record.meta["fps"]), fps):
            skips.skip(TOO_SHORT, f"{record.shard}:{record.key}", f"{record.num_frames} frames", shard=record.shard)
            continue
        sample = load_or_skip(record, request, reader, decoder, skips)
        if sample is None:
            continue
        for items, item in zip((videos, captions, metas), sample):
            items.append(item)
    reader.close()
    if not videos:
        raise ValueError(f"no usable clip of {num_frames} frames at {fps} fps in {roots!r}; skips: {dict(skips.counts)}")
    if len(videos) < n:
        logger.warning("asked for %d evaluation clips, %r holds only %d usable ones", n, roots, len(videos))
    return {"video": torch.stack(videos), "caption": captions, "meta": metas, "kind": "video", "step": -1,
            "skips": skips.take()}
