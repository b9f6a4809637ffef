"""The deterministic plan of batches: which bucket each batch uses, and which samples it holds.

The run is one global sequence of batches ``g = 0, 1, 2, ...`` that does not depend on the number of ranks: an
optimizer step of ``W`` data-parallel ranks with ``A`` accumulation micro-steps consumes ``W * A`` consecutive ones,
rank ``r`` taking ``start + r, start + r + W, ...`` (``start`` being where the step begins). So two runs that keep the
global batch (``W * A``) put the same samples into the same optimizer steps on any number of ranks, and a run can
change its number of ranks at a checkpoint without changing the data order. Everything is a pure function of
``(seed, g)``, so a run resumed at batch ``g`` reproduces batch ``g`` onwards exactly, without decoding anything
before it:

* Batch ``g``'s bucket is drawn from a generator seeded by ``(seed, g // BLOCK)``: an image bucket with probability
  ``image_prob``, a video bucket otherwise, and within a kind each bucket in proportion to the batches its samples
  fill (so all buckets run through their samples at the same pace). The ranks of one optimizer step may hold
  different kinds and shapes; the trainer makes every parameter take part in every rank's backward pass
  (``infra.unused_parameters``).
* Each bucket consumes its own endless stream: epoch ``e`` is a permutation of the bucket's samples seeded by
  ``(seed, bucket, e)``. The ``c``-th batch that uses a bucket takes stream positions ``[c * B, (c + 1) * B)`` (``B``
  its batch size). Hence within each epoch of a bucket every sample goes to exactly one batch: ranks and steps never
  duplicate a sample until the bucket's next epoch begins.
* Per-sample draws (start frame, crop position, replacements for bad samples) come from a generator seeded by
  ``(seed, g)``.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

BLOCK = 1024  # steps per schedule block: resuming at step k costs k / BLOCK small generator draws

_SCHEDULE, _PERMUTATION, _SAMPLE = 1, 2, 3  # stream tags, keeping the seeds of different uses apart


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


class BatchSchedule:
    """Which bucket each step uses. ``weights`` is one list per kind ("video", "image") of per-bucket weights."""

    def __init__(self, seed: int, image_prob: float, video_weights: Sequence[float], image_weights: Sequence[float]):
        self.seed = seed
        video = np.asarray(video_weights, dtype=float)
        image = np.asarray(image_weights, dtype=float)
        if video.sum() <= 0 and image.sum() <= 0:
            raise ValueError("no samples: every bucket is empty")
        # A kind with no samples cannot be drawn: the other takes all steps.
        self.image_prob = 0.0 if image.sum() <= 0 else 1.0 if video.sum() <= 0 else float(image_prob)
        self.num_video = len(video)
        self._video_cdf = np.cumsum(video) / video.sum() if video.sum() > 0 else None
        self._image_cdf = np.cumsum(image) / image.sum() if image.sum() > 0 else None

    def block(self, b: int) -> np.ndarray:
        """Bucket ids of steps ``[b * BLOCK, (b + 1) * BLOCK)``; video buckets first, then image buckets."""
        draws = _rng(self.seed, _SCHEDULE, b).random((BLOCK, 2))
        is_image = draws[:, 0] < self.image_prob
        ids = np.empty(BLOCK, dtype=np.int64)
        if self._video_cdf is not None:
            ids[~is_image] = np.searchsorted(self._video_cdf, draws[~is_image, 1], side="right")
        if self._image_cdf is not None:
            ids[is_image] = self.num_video + np.searchsorted(self._image_cdf, draws[is_image, 1], side="right")
        # Guard against a draw landing exactly on the cdf's end through rounding.
        return np.minimum(ids, np.where(is_image, self.num_video + self._num_image() - 1, self.num_video - 1))

    def _num_image(self) -> int:
        return 0 if self._image_cdf is None else len(self._image_cdf)

    def iterate(self, start: int, num_buckets: int) -> Iterator[tuple[int, int, int]]:
        """Yields ``(step, bucket, uses)`` from ``start`` on, ``uses`` being how often ``bucket`` came before."""
        uses = np.zeros(num_buckets, dtype=np.int64)
        first_block = start // BLOCK
        for b in range(first_block):
            uses += np.bincount(self.block(b), minlength=num_buckets)
        b = first_block
        while True:
            ids = self.block(b)
            for i, bucket in enumerate(ids.tolist()):
                step = b * BLOCK + i
                if step >= start:
                    yield step, bucket, int(uses[bucket])
                uses[bucket] += 1
            b += 1


class BucketStream:
    """A bucket's endless sequence of samples: epoch after epoch, each a fresh permutation of its pool."""

    def __init__(self, seed: int, bucket: int, pool: Sequence[int]):
        self.seed, self.bucket, self.pool = seed, bucket, np.asarray(pool, dtype=np.int64)
        self._epoch, self._order = -1, None

    def at(self, position: int) -> int:
        epoch, i = divmod(position, len(self.pool))
        if epoch != self._epoch:
            perm = _rng(self.seed, _PERMUTATION, self.bucket, epoch).permutation(len(self.pool))
            self._epoch, self._order = epoch, self.pool[perm]
        return int(self._order[i])

    def slot(self, uses: int, batch_size: int) -> list[int]:
        """The samples of the batch that draws this bucket for the ``uses``-th time."""
        first = uses * batch_size
        return [self.at(p) for p in range(first, first + batch_size)]


def sample_rng(seed: int, batch: int) -> np.random.Generator:
    # The trailing 0 keeps the streams of runs from before the order became rank-free (then: the rank, 0 on one).
    return _rng(seed, _SAMPLE, batch, 0)


def rank_batches(start: int, rank: int, world_size: int) -> Iterator[int]:
    """The global batch indices rank ``rank`` of ``world_size`` data-parallel ranks reads from ``start`` on."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if start < 0:
        raise ValueError(f"start_batch must be >= 0, got {start}")
    g = start + rank
    while True:
        yield g
        g += world_size
