"""Counting and reporting the samples the pipeline had to skip.

Bad input must neither stop training nor vanish silently: every skip is counted under a reason and warned about
through ``logging`` (at most one warning per reason every ``interval_s`` seconds, so a broken shard cannot flood the
log).
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
REASONS = (MISSING_META, BAD_META, ZERO_FPS, TOO_SHORT, UNREADABLE, TRUNCATED, UNREADABLE_SHARD, BAD_META_LINE,
           FPS_MISMATCH, BAD_CAPTION)


class SkipCounter:
    """Counts skips by reason and warns about them, rate-limited per reason."""

    def __init__(self, interval_s: float = 30.0):
        self.counts: Counter[str] = Counter()
        self.interval_s = interval_s
        self._last_warned: dict[str, float] = {}
        self._unwarned: Counter[str] = Counter()

    def skip(self, reason: str, what: str, detail: str = "") -> None:
        self.counts[reason] += 1
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

