"""Counting and reporting the samples the pipeline had to skip.

Bad input must neither stop training nor vanish silently: every skip is counted under a reason and under the shard
it came from (by path: several data folders may each hold a ``video-000000.tar``), and warned about through
``logging`` (at most one warning per reason every ``interval_s`` seconds, so a broken shard cannot flood the log).
Since most skips are then never named one by one, ``shard_summary`` lists every shard that had skips with its counts
per reason; the data set logs it after indexing, the trainer at the end of training (``ShardSkipTotals``).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping

logger = logging.getLogger("infra.data")

# Reasons, as they appear in the counts.
MISSING_META = "missing_meta"  # a tar sample with no line in its shard's meta.jsonl
BAD_META = "bad_meta"  # a meta line without a usable duration
ZERO_FPS = "zero_fps"  # a meta line with fps <= 0 or missing
TOO_SHORT = "too_short"  # a clip shorter than the span the batch shape needs
UNREADABLE = "unreadable"  # a file the decoder cannot open or decode (corrupt, truncated)
TRUNCATED = "truncated"  # the decoder delivered fewer frames than the clip announced
UNREADABLE_SHARD = "unreadable_shard"  # a tar file that cannot be (fully) indexed
BAD_META_LINE = "bad_meta_line"  # a meta.jsonl line that is not a UTF-8 JSON object with a "key"
# Counted, but the sample is kept (corrected):
FPS_MISMATCH = "fps_mismatch"  # the meta line's fps disagrees with the stream's; the stream's is used
BAD_CAPTION = "bad_caption"  # a caption that is not UTF-8 (undecodable bytes replaced) or over MAX_CAPTION_CHARS (cut)
# Counted while indexing, not samples lost from a batch but data that is not what it should be:
EMPTY_SHARD = "empty_shard"  # a tar file with no member at all
NO_META_FILE = "no_meta_file"  # a shard without its <name>.meta.jsonl (its videos are then skipped as missing_meta)
META_WITHOUT_SAMPLE = "meta_without_sample"  # a meta line whose key has no member in the tar
NO_MEDIA = "no_media"  # a sample with files (.txt, .id, ...) but no video or image
REASONS = (MISSING_META, BAD_META, ZERO_FPS, TOO_SHORT, UNREADABLE, TRUNCATED, UNREADABLE_SHARD, BAD_META_LINE,
           FPS_MISMATCH, BAD_CAPTION, EMPTY_SHARD, NO_META_FILE, META_WITHOUT_SAMPLE, NO_MEDIA)


class SkipCounter:
    """Counts skips by reason (and by shard, when the skip names one) and warns about them, rate-limited per
    reason."""

    def __init__(self, interval_s: float = 30.0):
        self.counts: Counter[str] = Counter()
        self.shards: dict[str, Counter[str]] = {}
        self.interval_s = interval_s
        self._last_warned: dict[str, float] = {}
        self._unwarned: Counter[str] = Counter()
        self._seen: set[tuple[str, str]] = set()

    def skip(self, reason: str, what: str, detail: str = "", shard: str | None = None, once: bool = False) -> None:
        """Count one skip of ``what`` (``<shard path>:<key>``, a file, a line) for ``reason``; ``shard``: the shard
        path it is counted under in the summary; ``once``: count a ``(reason, what)`` only the first time (data
        indexed twice, for videos and for images, is counted once)."""
        if once:
            if (reason, what) in self._seen:
                return
            self._seen.add((reason, what))
        self.counts[reason] += 1
        if shard is not None:
            self.shards.setdefault(str(shard), Counter())[reason] += 1
        self._unwarned[reason] += 1
        now = time.monotonic()
        if now - self._last_warned.get(reason, -float("inf")) >= self.interval_s:
            extra = f" (+{self._unwarned[reason] - 1} more since the last warning)" if self._unwarned[reason] > 1 else ""
            logger.warning("skipped %s: %s%s%s; %d skipped for this reason so far",
                           what, reason, f" ({detail})" if detail else "", extra, self.counts[reason])
            self._last_warned[reason] = now
            self._unwarned[reason] = 0

    def take(self) -> dict[str, int]:
        """The counts since the last ``take()``, then reset them (what one batch reports)."""
        out = dict(self.counts)
        self.counts.clear()
        return out

    def take_shards(self) -> dict[str, dict[str, int]]:
        """The per-shard counts since the last ``take_shards()``, then reset them."""
        out = {shard: dict(counts) for shard, counts in self.shards.items()}
        self.shards.clear()
        return out


def shard_summary(shards: Mapping[str, Mapping[str, int]], title: str) -> str:
    """``title`` and one line per shard that had skips: its path and its counts per reason (most skipped first)."""
    lines = [f"{title}: {sum(sum(c.values()) for c in shards.values())} in {len(shards)} shard(s)"]
    for shard in sorted(shards, key=lambda s: (-sum(shards[s].values()), s)):
        counts = ", ".join(f"{reason} x{n}" for reason, n in sorted(shards[shard].items(), key=lambda kv: -kv[1]))
        lines.append(f"  {shard}: {counts}")
    return "\n".join(lines)


class ShardSkipTotals:
    """Adds up what batches report per shard (``batch["skipped_shards"]``, and the indexing skips the first batch
    after a start carries in ``batch["index_skipped_shards"]``), for one summary at the end of a training."""

    def __init__(self):
        self.loading: dict[str, Counter[str]] = {}
        self.indexing: dict[str, dict[str, int]] = {}

    def update(self, batch: Mapping) -> None:
        if not isinstance(batch, Mapping):
            return
        for shard, counts in batch.get("skipped_shards", {}).items():
            self.loading.setdefault(shard, Counter()).update(counts)
        for shard, counts in batch.get("index_skipped_shards", {}).items():
            self.indexing[shard] = dict(counts)

    def merged(self, others: list["ShardSkipTotals"]) -> "ShardSkipTotals":
        """Every rank's totals in one: loading skips add up (each rank read other batches), indexing skips are the
        same on every rank (each indexed all shards)."""
        out = ShardSkipTotals()
        for part in [self, *others]:
            for shard, counts in part.loading.items():
                out.loading.setdefault(shard, Counter()).update(counts)
            out.indexing.update(part.indexing)
        return out

    def summary(self) -> str:
        """The end-of-training report, or "" when nothing was skipped."""
        parts = []
        if self.indexing:
            parts.append(shard_summary(self.indexing, "samples skipped while indexing the shards"))
        if self.loading:
            parts.append(shard_summary(self.loading, "samples skipped while training (every rank)"))
        return "\n".join(parts)


def skip_logs(batch: Mapping) -> dict[str, float]:
    """What a trainer logs about a batch's data: ``data/skipped_<reason>`` for the skips that happened while it was
    produced and, on the first batch after (re)start, ``data/index_skipped_<reason>`` for those found while indexing."""
    logs = {f"data/skipped_{k}": float(v) for k, v in batch.get("skips", {}).items()}
    logs.update({f"data/index_skipped_{k}": float(v) for k, v in batch.get("index_skips", {}).items()})
    return logs


class SkipTotals:
    """Adds up the per-batch skip counts a trainer receives, plus those found while indexing the shards.

    Each batch carries the skips that happened while it was produced (``batch["skips"]``), whichever worker produced it,
    so summing them over batches gives exact totals with any number of workers, and the same totals after a resume.
    """

    def __init__(self, index_skips: Mapping[str, int] | None = None):
        self.totals: Counter[str] = Counter(index_skips or {})

    def update(self, batch_or_counts: Mapping) -> None:
        counts = batch_or_counts.get("skips", batch_or_counts)
        self.totals.update({k: int(v) for k, v in counts.items()})

    def as_dict(self, prefix: str = "") -> dict[str, int]:
        return {f"{prefix}{k}": v for k, v in sorted(self.totals.items())}

