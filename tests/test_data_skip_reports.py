"""Every skipped shard named: by its path (several folders may each hold a video-000000.tar), in one summary per
shard and reason however rate-limited the warnings were; empty tars, empty folders, missing meta files, meta lines
without a sample and samples without media are counted and named; a root with no usable sample stops the run naming
it; a checkpoint passed over for a missing COMPLETE marker is named."""
import json
import logging

import pytest

from infra.data.config import DataConfig
from infra.data.dataset import ShardBatchDataset
from infra.data.shard_index import index_shards, meta_path
from infra.data.skips import ShardSkipTotals, SkipCounter, shard_summary
from test_data_helpers import video_entry
from test_data_malformed import _tar, _video_shard

SMALL = dict(num_frames=5, fps=8.0, height=32, width=32, video_batch_size=1, image_prob=0.0)


def test_two_folders_with_the_same_shard_name_are_told_apart(tmp_path, caplog):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        _video_shard(tmp_path / folder, [{"key": "x", "duration": 1.0, "fps": 0}], name="video-000000.tar")
    skips = SkipCounter(interval_s=0)
    with caplog.at_level("WARNING", logger="infra.data"):
        index_shards(f"{tmp_path / 'a'},{tmp_path / 'b'}", "video", skips)
    for folder in ("a", "b"):
        assert f"{tmp_path / folder / 'video-000000.tar'}:x" in caplog.text
    assert set(skips.take_shards()) == {str(tmp_path / f / "video-000000.tar") for f in ("a", "b")}


def test_the_summary_lists_every_shard_despite_rate_limited_warnings(tmp_path, caplog):
    data, meta = video_entry(9, 8.0)
    shards = []
    for i in range(5):  # each shard: one good sample, one without a meta line, one with zero fps
        shard, _ = _video_shard(tmp_path, [{"key": "a", **meta}, {"key": "c", **meta, "fps": 0}],
                                {"a.mp4": data, "b.mp4": data, "c.mp4": data}, name=f"video-{i:06d}.tar")
        shards.append(str(shard))
    skips = SkipCounter(interval_s=30)
    with caplog.at_level("WARNING", logger="infra.data"):
        index_shards(str(tmp_path), "video", skips)
    assert caplog.text.count("WARNING") == 2  # one warning per reason, the other 8 skips unnamed there
    by_shard = skips.take_shards()
    assert by_shard == {s: {"missing_meta": 1, "zero_fps": 1} for s in shards}
    summary = shard_summary(by_shard, "skipped while indexing")
    assert summary.splitlines()[0] == "skipped while indexing: 10 in 5 shard(s)"
    for s in shards:
        assert f"  {s}: " in summary and "missing_meta x1" in summary


def test_empty_tars_folders_missing_meta_files_and_orphans_are_counted_by_path(tmp_path, caplog):
    data, meta = video_entry(9, 8.0)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "zero-000000.tar").write_bytes(b"")  # a 0-byte file
    _tar(tmp_path / "blank-000000.tar", {})  # a valid tar with no member
    _tar(tmp_path / "nometa-000000.tar", {"a.mp4": data})  # no nometa-000000.meta.jsonl
    _video_shard(tmp_path, [{"key": "a", **meta}, {"key": "ghost", **meta}],
                 {"a.mp4": data, "lonely.txt": b"a caption without a video"}, name="mixed-000000.tar")
    skips = SkipCounter(interval_s=0)
    with caplog.at_level("WARNING", logger="infra.data"):
        records = index_shards(f"{tmp_path},{tmp_path / 'empty_dir'}", "video", skips)
        index_shards(str(tmp_path), "image", skips)  # the same shards again, for images: nothing counted twice
    assert [r.key for r in records] == ["a"]
    by_shard = skips.take_shards()
    assert by_shard[str(tmp_path / "zero-000000.tar")] == {"empty_shard": 1}
    assert by_shard[str(tmp_path / "blank-000000.tar")] == {"empty_shard": 1}
    assert by_shard[str(tmp_path / "nometa-000000.tar")] == {"no_meta_file": 1, "missing_meta": 1}
    assert by_shard[str(tmp_path / "mixed-000000.tar")] == {"meta_without_sample": 1, "no_media": 1}
    assert f"data root {tmp_path / 'empty_dir'} holds no .tar shards" in caplog.text
    assert str(meta_path(tmp_path / "nometa-000000.tar")) in caplog.text


def test_a_root_with_no_usable_sample_stops_naming_the_root(tmp_path):
    data, meta = video_entry(9, 8.0)
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    _video_shard(good, [{"key": "a", **meta}, {"key": "b", **meta}])
    _video_shard(bad, [{"key": "a", **meta, "fps": 0}])  # b has no line, a has fps 0
    with pytest.raises(ValueError, match=rf"data\.video_roots: {bad} has no usable video sample\n"
                                         rf"what indexing skipped there: 2 in 1 shard\(s\)\n  {bad}/s-000000.tar: "):
        ShardBatchDataset(DataConfig(video_roots=f"{good},{bad}", **SMALL))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match=r"nothing has no usable video sample \(it holds no \.tar shards\)"):
        ShardBatchDataset(DataConfig(video_roots=str(tmp_path / "nothing"), **SMALL))
    ShardBatchDataset(DataConfig(video_roots=str(good), **SMALL))  # a usable root alone trains


def test_totals_merge_over_ranks():
    a, b = ShardSkipTotals(), ShardSkipTotals()
    a.update({"skipped_shards": {"/x.tar": {"unreadable": 2}}, "index_skipped_shards": {"/y.tar": {"zero_fps": 1}}})
    b.update({"skipped_shards": {"/x.tar": {"unreadable": 1}, "/z.tar": {"truncated": 1}},
              "index_skipped_shards": {"/y.tar": {"zero_fps": 1}}})
    merged = a.merged([b])
    assert merged.loading == {"/x.tar": {"unreadable": 3}, "/z.tar": {"truncated": 1}}
    assert merged.indexing == {"/y.tar": {"zero_fps": 1}}  # every rank indexed the same shards
    assert "/x.tar: unreadable x3" in merged.summary() and ShardSkipTotals().summary() == ""


def test_a_checkpoint_without_its_complete_marker_that_latest_names_is_named(tmp_path, caplog):
    from infra.checkpoint import CheckpointManager

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step:06d}").mkdir(parents=True)
    (root / "step_000002" / "COMPLETE").write_text("2\n")
    (root / "latest").write_text("step_000004\n")
    with caplog.at_level(logging.WARNING):
        candidates = CheckpointManager(root).candidates("auto")
    assert candidates == [root / "step_000002"]
    assert f"{root / 'step_000004'}" in caplog.text and "COMPLETE" in caplog.text and "latest" in caplog.text
