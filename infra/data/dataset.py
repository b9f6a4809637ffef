"""The training data stream: homogeneous batches of videos or images, deterministic and resumable.

``build_loader(cfg, rank, world_size, seed, start_batch)`` returns a ``DataLoader`` whose ``i``-th batch is global
batch ``start_batch + rank + i * world_size`` of the run (see ``sampling`` for how batches are planned: the global
sequence does not depend on the number of ranks). DataLoader worker ``w`` of ``n`` produces the rank's batches
``w, w + n, ...``; the DataLoader hands them out round-robin, so they arrive in order and no batch is produced twice.

A batch is a dict::

    video    float tensor (B, 3, T, H, W) in [-1, 1]   (T == 1 for images)
    caption  list[str], "" where a sample has none
    meta     list[dict]: the sample's meta line (extra fields such as ``truth`` pass through) plus ``key``, ``shard``,
             ``start_frame``, ``frame_indices``, ``source_fps``, ``source_size`` (w, h)
    kind     "image" | "video"
    step     the batch's global index in the run (``g``; the same on any number of ranks)
    skips    {reason: count} of samples skipped while producing this batch; add them up with ``SkipTotals``
    index_skips  (first batch after start only) {reason: count} of samples skipped while indexing the shards

Bad samples (unreadable, truncated, too short) are replaced by a random sample of the same bucket, drawn from the
batch's own generator, so the replacement is as deterministic as the rest.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .buckets import assign_buckets, frame_offsets, frame_span, start_frame
from .config import BucketConfig, DataConfig, weighted_roots
from .decode import NoVideoStream, TruncatedVideo, decode_image, image_size, open_video
from .sampling import BatchSchedule, BucketStream, sample_rng
from .shard_index import SampleRecord, ShardReader, find_shards, index_shards
from .skips import BAD_CAPTION, FPS_MISMATCH, TOO_SHORT, TRUNCATED, UNREADABLE, SkipCounter, shard_summary
from .transforms import frames_to_tensor

logger = logging.getLogger("infra.data")

MAX_CAPTION_CHARS = 4096  # far beyond any text encoder's window (T5: 226 tokens); more is a broken file
MAX_ATTEMPTS_PER_SAMPLE = 50  # consecutive failures to fill one slot before we conclude the data set is broken


class SampleError(Exception):
    """A sample that cannot be used, with the reason it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class ClipRequest:
    """What to cut from one sample: the batch shape, where to start (u_start) and where to crop (uy, ux)."""

    frames: int
    height: int
    width: int
    fps: float
    u_start: float = 0.0
    uy: float = 0.5
    ux: float = 0.5
    resize: int = 0  # short side the frames are brought to before cropping (0: just cover height x width)


def caption_of(record: SampleRecord, reader: ShardReader, skips: SkipCounter | None = None) -> str:
    """The sample's ``.txt`` (else its meta line's ``caption``). Undecodable bytes are replaced and a caption over
    ``MAX_CAPTION_CHARS`` is cut; either is counted (``bad_caption``), the sample kept."""
    skips = skips if skips is not None else SkipCounter()
    where = f"{record.shard}:{record.key}"
    if "txt" in record.files:
        raw = reader.read(record, "txt")
        try:
            caption = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            skips.skip(BAD_CAPTION, where, f"not UTF-8 ({e.reason} at byte {e.start}); undecodable bytes replaced",
                       shard=record.shard)
            caption = raw.decode("utf-8", errors="replace").strip()
    else:
        caption = str(record.meta.get("caption") or "")
    if len(caption) > MAX_CAPTION_CHARS:
        skips.skip(BAD_CAPTION, where, f"{len(caption)} characters, cut to {MAX_CAPTION_CHARS}", shard=record.shard)
        caption = caption[:MAX_CAPTION_CHARS]
    return caption


def load_sample(record: SampleRecord, request: ClipRequest, reader: ShardReader,
                decoder: str, skips: SkipCounter | None = None) -> tuple[torch.Tensor, str, dict]:
    """Decode and cut one sample: (3, T, H, W) in [-1, 1], caption, meta. Raises ``SampleError`` for bad input;
    corrections that keep the sample (fps, caption) are counted in ``skips``."""
    skips = skips if skips is not None else SkipCounter()
    try:
        data = reader.read(record, record.media_ext)
        caption = caption_of(record, reader, skips)
    except (OSError, EOFError) as e:  # EOFError: a member cut short by a truncated tar
        raise SampleError(UNREADABLE, repr(e)) from e
    meta = {**record.meta, "key": record.key, "shard": record.shard}
    if record.kind == "image":
        try:
            frames = decode_image(data)
        except Exception as e:  # PIL raises many types for bad files
            raise SampleError(UNREADABLE, repr(e)) from e
        meta.update(start_frame=0, frame_indices=[0], source_size=[frames.shape[2], frames.shape[1]])
        return (frames_to_tensor(frames, request.height, request.width, request.uy, request.ux, request.resize),
                caption, meta)

    try:
        source = open_video(data, decoder)
    except NoVideoStream as e:
        raise SampleError(UNREADABLE, str(e)) from e
    except Exception as e:  # decord and PyAV raise their own error types for corrupt data
        raise SampleError(UNREADABLE, repr(e)) from e
    # Frames are located by the stream's own rate: a meta fps that disagrees would pick the wrong frames.
    meta_fps, source_fps = float(record.meta["fps"]), source.fps if source.fps > 0 else float(record.meta["fps"])
    promised = record.num_frames
    if abs(source_fps - meta_fps) > 0.01 * source_fps:
        skips.skip(FPS_MISMATCH, f"{record.shard}:{record.key}",
                   f"meta line says {meta_fps:g} fps, the stream {source_fps:g} fps; the stream's is used",
                   shard=record.shard)
        promised = int(math.floor(float(record.meta["duration"]) * source_fps + 1e-6))
    try:
        frames, start, indices = _cut(source, promised, source_fps, request)
    finally:
        source.close()
    meta.update(start_frame=start, frame_indices=indices, source_fps=source_fps,
                source_size=[frames.shape[2], frames.shape[1]])
    return (frames_to_tensor(frames, request.height, request.width, request.uy, request.ux, request.resize),
            caption, meta)


def load_or_skip(record: SampleRecord, request: ClipRequest, reader: ShardReader, decoder: str,
                 skips: SkipCounter) -> tuple[torch.Tensor, str, dict] | None:
    """``load_sample``, or None with the sample counted in ``skips`` (by reason) when its input is bad."""
    try:
        return load_sample(record, request, reader, decoder, skips)
    except SampleError as e:
        skips.skip(e.reason, f"{record.shard}:{record.key}", str(e), shard=record.shard)
        return None


def _cut(source, promised: int, source_fps: float, request: ClipRequest) -> tuple[np.ndarray, int, list[int]]:
    """The requested frames of an opened clip, with the start and source indices used."""
    # The meta line's duration undercounts real clips by up to a frame; trust the container when it says fewer.
    available = min(promised, source.num_frames) if source.num_frames > 0 else promised
    span = frame_span(request.frames, source_fps, request.fps)
    if available < span:
        raise SampleError(TRUNCATED if available < promised else TOO_SHORT, f"{available} frames, {span} needed")
    start = start_frame(request.u_start, available, span)
    indices = [start + o for o in frame_offsets(request.frames, source_fps, request.fps)]
    try:
        return source.get(indices), start, indices
    except TruncatedVideo as e:
        raise SampleError(TRUNCATED, str(e)) from e
    except Exception as e:
        raise SampleError(UNREADABLE, repr(e)) from e


class ShardBatchDataset(IterableDataset):
    """Endless homogeneous batches for one rank, from global batch ``start_batch`` on; see the module docstring."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 0, start_batch: int = 0):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.cfg, self.rank, self.world_size, self.seed, self.start_batch = cfg, rank, world_size, seed, start_batch
        self.reader = ShardReader()
        index_skips = SkipCounter()
        # A kind that can never be drawn (image_prob 0 or 1) is neither indexed nor given buckets.
        uses_video, uses_image = cfg.image_prob < 1, cfg.image_prob > 0
        video, video_spans = _index_roots(cfg.video_roots, "video", index_skips) if uses_video else ([], [])
        image, image_spans = _index_roots(cfg.image_roots, "image", index_skips) if uses_image else ([], [])
        video_buckets = cfg.video_buckets() if uses_video else []
        image_buckets = cfg.image_buckets() if uses_image else []
        video_pools = assign_buckets(video, video_buckets, cfg.fps, index_skips)
        image_pools = assign_buckets(image, image_buckets, cfg.fps, index_skips, self._image_aspect)
        index_shard_skips = index_skips.take_shards()
        _check_every_root_is_usable("data.video_roots", "video", video_spans, video_pools, index_shard_skips)
        _check_every_root_is_usable("data.image_roots", "image", image_spans, image_pools, index_shard_skips)
        self.records = video + image
        self.buckets: list[BucketConfig] = video_buckets + image_buckets
        self.kinds = ["video"] * len(video_buckets) + ["image"] * len(image_buckets)
        self.pools = video_pools + [[i + len(video) for i in pool] for pool in image_pools]
        self.index_skips = index_skips.take()
        self.index_shard_skips = index_shard_skips
        # A bucket is drawn in proportion to the batches its pool fills, so every bucket finishes epochs together.
        weights = [len(pool) / b.batch_size for pool, b in zip(self.pools, self.buckets)]
        self.schedule = BatchSchedule(seed, cfg.image_prob, weights[:len(video_buckets)], weights[len(video_buckets):])
        self.streams = [BucketStream(seed, b, pool) for b, pool in enumerate(self.pools)]
        for bucket, kind, pool in zip(self.buckets, self.kinds, self.pools):
            if not pool:
                logger.warning("%s bucket %s has no samples and is never drawn", kind, bucket)
        if self.index_skips and rank == 0:  # every rank indexes the same shards; one report
            logger.warning("indexing the shards skipped samples: %s", self.index_skips)
            logger.warning("%s", shard_summary(index_shard_skips, "skipped while indexing the shards"))
        self.reader.close()

    def _image_aspect(self, record: SampleRecord) -> float | None:
        try:
            w, h = image_size(self.reader.read(record, record.media_ext))
            return w / h
        except Exception:
            return None  # a bad image is caught and counted when it is decoded

    def batch(self, step: int, bucket: int, uses: int, skips: SkipCounter) -> dict:
        spec, kind = self.buckets[bucket], self.kinds[bucket]
        stream = self.streams[bucket]
        rng = sample_rng(self.seed, step)
        draws = rng.random((spec.batch_size, 3))
        videos, captions, metas = [], [], []
        for index, (u_start, uy, ux) in zip(stream.slot(uses, spec.batch_size), draws):
            for attempt in range(MAX_ATTEMPTS_PER_SAMPLE):
                if attempt:
                    # Replace a bad sample by a random one of the same bucket, drawn from this batch's generator.
                    index = int(self.pools[bucket][rng.integers(len(self.pools[bucket]))])
                    u_start, uy, ux = rng.random(3)
                if self.cfg.crop == "center":
                    uy = ux = 0.5
                record = self.records[index]
                request = ClipRequest(spec.frames, spec.height, spec.width, self.cfg.fps, u_start, uy, ux,
                                      self.cfg.resize)
                sample = load_or_skip(record, request, self.reader, self.cfg.decoder, skips)
                if sample is None:
                    continue
                for items, item in zip((videos, captions, metas), sample):
                    items.append(item)
                break
            else:
                raise RuntimeError(f"{MAX_ATTEMPTS_PER_SAMPLE} samples in a row of {kind} bucket {spec} could not be "
                                   f"used; is the data broken? skips: {dict(skips.counts)}")
        return {"video": torch.stack(videos), "caption": captions, "meta": metas, "kind": kind, "step": step,
                "skips": skips.take(), "skipped_shards": skips.take_shards()}

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skips = SkipCounter()
        first = worker == 0  # the first batch after (re)start carries what indexing skipped, once per rank
        own_first = self.start_batch + self.rank
        for step, bucket, uses in self.schedule.iterate(own_first, len(self.buckets)):
            mine, rest = divmod(step - own_first, self.world_size)  # mine: the rank's batch number since the start
            if rest == 0 and mine % num_workers == worker:
                batch = self.batch(step, bucket, uses, skips)
                if first:
                    batch["index_skips"], first = dict(self.index_skips), False
                    batch["index_skipped_shards"] = dict(self.index_shard_skips)
                yield batch


def _index_roots(roots: str, kind: str, skips: SkipCounter) -> tuple[list[SampleRecord], list[tuple[str, int, int]]]:
    """The records of every root (a root weighted ``path*N`` lists its records N times), and each root's
    (root, first, end) range of them."""
    records, spans = [], []
    for root, weight in weighted_roots(roots):
        found = index_shards(root, kind, skips)
        spans.append((root, len(records), len(records) + len(found) * weight))
        records += found * weight
    return records, spans


def _check_every_root_is_usable(key: str, kind: str, spans: list[tuple[str, int, int]], pools: list[list[int]],
                                shard_skips: dict[str, dict[str, int]]) -> None:
    """Stop naming a root none of whose samples can be used (a wrong path, a folder of the other kind, all broken),
    with what indexing found wrong in its shards."""
    usable = {i for pool in pools for i in pool}
    for root, first, end in spans:
        if any(i in usable for i in range(first, end)):
            continue
        shards = {str(p) for p in find_shards([root])} if Path(root).exists() else set()
        found = {s: c for s, c in shard_skips.items() if s in shards}
        detail = ("\n" + shard_summary(found, "what indexing skipped there")) if found else (
            f" ({len(shards)} shard(s), {end - first} {kind} sample(s) indexed, none fits a {kind} bucket)"
            if shards else " (it holds no .tar shards)")
        raise ValueError(f"{key}: {root} has no usable {kind} sample{detail}")


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 0, start_batch: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """The DataLoader for one rank; its ``i``-th batch is global batch ``start_batch + rank + i * world_size``."""
    dataset = ShardBatchDataset(cfg, rank, world_size, seed, start_batch)
    extra = {"prefetch_factor": cfg.prefetch_factor} if cfg.num_workers > 0 else {}
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, pin_memory=pin_memory, **extra)
