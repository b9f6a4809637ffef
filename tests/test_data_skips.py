import logging

from infra.data.skips import SkipCounter, SkipTotals


def test_warnings_are_rate_limited_per_reason_and_counts_exact(caplog):
    skips = SkipCounter(interval_s=60.0)
    with caplog.at_level(logging.WARNING, logger="infra.data"):
        for i in range(5):
            skips.skip("unreadable", f"shard:{i}", "bad bytes")
        skips.skip("too_short", "shard:9")
    assert [r.args[1] for r in caplog.records] == ["unreadable", "too_short"]  # one warning per reason
    assert skips.take() == {"unreadable": 5, "too_short": 1}
    assert skips.take() == {}  # take() reports each skip once


def test_warning_after_the_interval_mentions_the_unwarned(caplog):
    skips = SkipCounter(interval_s=0.0)
    with caplog.at_level(logging.WARNING, logger="infra.data"):
        skips.skip("truncated", "a")
        skips.skip("truncated", "b")
    assert len(caplog.records) == 2 and "2 skipped for this reason so far" in caplog.records[-1].getMessage()


def test_totals_add_index_and_batch_counts():
    totals = SkipTotals({"missing_meta": 2})
    totals.update({"video": None, "skips": {"unreadable": 1}})
    totals.update({"unreadable": 2, "truncated": 1})
    assert totals.as_dict("data/skipped/") == {
        "data/skipped/missing_meta": 2, "data/skipped/truncated": 1, "data/skipped/unreadable": 3}
