import itertools
import logging
from collections import Counter

import numpy as np
import pytest
import torch

from infra.data import dataset as dataset_module
from infra.data.config import BucketConfig, DataConfig
from infra.data.dataset import ShardBatchDataset, build_loader
from infra.data.sampling import BatchSchedule
from infra.data.shard_writer import ShardWriter
from infra.data.skips import SkipTotals
from test_data_helpers import batch_keys, frame_index_of, video_entry, write_image_shards, write_video_shards

SMALL = {"num_frames": 5, "fps": 8.0, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return write_video_shards(tmp_path_factory.mktemp("videos"), num_samples=8, per_shard=3)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_shards(tmp_path_factory.mktemp("images"), num_samples=12, sizes=((48, 64), (64, 32)))


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_video_batches_shape_range_captions_and_frames(videos):
    cfg = DataConfig(video_roots=str(videos), image_prob=0.0, video_batch_size=2, crop="random", **SMALL)
    batches = _take(build_loader(cfg, seed=3), 3)
    for step, batch in enumerate(batches):
        assert batch["kind"] == "video" and batch["step"] == step and batch["skips"] == {}
        x = batch["video"]
        assert x.shape == (2, 3, 5, 32, 32) and x.dtype == torch.float32
        assert -1 <= x.min() and x.max() <= 1
        for sample, caption, meta in zip(x, batch["caption"], batch["meta"]):
            assert caption == f"clip number {meta['truth']['index']}"  # .txt caption, truth passed through
            assert meta["fps"] == 24.0 and meta["source_size"] == [64, 64]
            # 8 fps from 24 fps: every third source frame, from the planned start
            assert meta["frame_indices"] == [meta["start_frame"] + 3 * i for i in range(5)]
            assert [frame_index_of(sample[:, t]) for t in range(5)] == meta["frame_indices"]
    assert len({m["start_frame"] for b in batches for m in b["meta"]}) > 1  # starts are random


def test_two_ranks_two_workers_cover_an_epoch_exactly_once(videos):
    # 8 clips, batch 1, 2 ranks: an epoch is 4 steps; each (step, rank) slot gets a distinct clip.
    cfg = DataConfig(video_roots=str(videos), image_prob=0.0, video_batch_size=1, num_workers=2, **SMALL)
    keys, steps = [], {0: [], 1: []}
    for rank in (0, 1):
        for batch in _take(build_loader(cfg, rank=rank, world_size=2, seed=7), 4):
            keys += batch_keys(batch)
            steps[rank].append(batch["step"])
    assert sorted(keys) == [f"v{i:04d}" for i in range(8)]
    assert steps == {0: [0, 2, 4, 6], 1: [1, 3, 5, 7]}  # the global batches, in order despite two workers


def _same_batches(a, b):
    assert [x["step"] for x in a] == [x["step"] for x in b]
    for x, y in zip(a, b):
        assert x["kind"] == y["kind"] and x["caption"] == y["caption"] and x["meta"] == y["meta"]
        assert torch.equal(x["video"], y["video"])


def test_resume_reproduces_the_uninterrupted_sequence_without_decoding_the_skipped(videos, images, monkeypatch):
    cfg = DataConfig(video_roots=str(videos), image_roots=str(images), image_prob=0.5, crop="random",
                     image_batch_size=3, video_batch_size=2, **SMALL)
    full = _take(build_loader(cfg, rank=1, world_size=2, seed=11), 9)
    assert {b["kind"] for b in full} == {"image", "video"}

    calls = []
    real = dataset_module.load_sample
    monkeypatch.setattr(dataset_module, "load_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    # full[k] is global batch 2k + 1; resuming at global batch 12, rank 1 reads 13, 15, 17 = full[6:9].
    resumed = _take(build_loader(cfg, rank=1, world_size=2, seed=11, start_batch=12), 3)
    _same_batches(full[6:], resumed)
    assert len(calls) == sum(len(b["meta"]) for b in resumed)  # batches 0..5 were not decoded
    monkeypatch.undo()

    cfg.num_workers = 2  # the worker count does not change the sequence either
    _same_batches(full[5:], _take(build_loader(cfg, rank=1, world_size=2, seed=11, start_batch=10), 4))
    # another seed is another sequence
    other = _take(build_loader(cfg, rank=1, world_size=2, seed=12, start_batch=10), 4)
    assert [b["meta"] for b in other] != [b["meta"] for b in full[5:]]


def test_global_sequence_does_not_depend_on_the_number_of_ranks(videos, images):
    """W ranks read the global batches start + r, start + r + W, ...: 1, 2 and 3 ranks, from the start and from a
    resume point, see the same batches (same samples, crops and start frames), whatever the rank holding them."""
    cfg = DataConfig(video_roots=str(videos), image_roots=str(images), image_prob=0.5, crop="random",
                     image_batch_size=3, video_batch_size=2, **SMALL)
    one = _take(build_loader(cfg, seed=4), 12)
    assert [b["step"] for b in one] == list(range(12)) and {b["kind"] for b in one} == {"image", "video"}
    for world, start in ((2, 0), (3, 0), (2, 6), (3, 3)):
        by_index = {}
        for rank in range(world):
            for batch in _take(build_loader(cfg, rank=rank, world_size=world, seed=4, start_batch=start),
                               (12 - start) // world):
                by_index[batch["step"]] = batch
        assert sorted(by_index) == list(range(start, 12))
        _same_batches(one[start:], [by_index[g] for g in range(start, 12)])


def test_image_batches_are_one_frame_with_captions(images):
    cfg = DataConfig(image_roots=str(images), image_prob=1.0, image_batch_size=4, **SMALL)
    batch = _take(build_loader(cfg), 1)[0]
    assert batch["kind"] == "image" and batch["video"].shape == (4, 3, 1, 32, 32)
    assert all(c.startswith("image number ") for c in batch["caption"])


def test_mixing_ratio_follows_image_prob():
    schedule = BatchSchedule(seed=0, image_prob=0.125, video_weights=[1.0], image_weights=[1.0])
    kinds = [bucket for _, bucket, _ in itertools.islice(schedule.iterate(0, 2), 20000)]
    assert np.mean(kinds) == pytest.approx(0.125, abs=0.01)  # 4 sigma is 0.0094
    # the schedule a loader follows is this one: kinds agree step by step
    again = [bucket for _, bucket, _ in itertools.islice(schedule.iterate(3000, 2), 100)]
    assert again == kinds[3000:3100]


def test_mixing_in_the_loader(videos, images):
    cfg = DataConfig(video_roots=str(videos), image_roots=str(images), image_prob=0.25, image_batch_size=2, **SMALL)
    ds = ShardBatchDataset(cfg, seed=5)
    kinds = [ds.kinds[b] for _, b, _ in itertools.islice(ds.schedule.iterate(0, len(ds.buckets)), 4000)]
    assert kinds.count("image") / 4000 == pytest.approx(0.25, abs=0.03)
    got = [b["kind"] for b in _take(build_loader(cfg, seed=5), 12)]
    assert got == kinds[:12]
    # every rank follows the one schedule of global batches
    other_rank = ShardBatchDataset(cfg, rank=1, world_size=2, seed=5)
    assert [ds.kinds[b] for _, b, _ in itertools.islice(other_rank.schedule.iterate(0, len(ds.buckets)), 4000)] == kinds


def test_buckets_give_homogeneous_batches_with_their_batch_size(tmp_path, images):
    # clips of two lengths and images of two aspect ratios; a bucket for each
    with ShardWriter(tmp_path, prefix="mixed-") as writer:
        for i, (frames, size) in enumerate([(16, 64), (40, 64)] * 3):
            data, meta = video_entry(frames, 24.0, size)
            writer.write(f"m{i}", {"mp4": data}, meta)
    buckets = [BucketConfig(5, 32, 32, 3), BucketConfig(13, 32, 32, 2),
               BucketConfig(1, 24, 32, 4), BucketConfig(1, 32, 16, 5)]
    cfg = DataConfig(video_roots=str(tmp_path), image_roots=str(images), image_prob=0.3, buckets=buckets, **SMALL)
    ds = ShardBatchDataset(cfg, seed=0)
    # 16-frame clips can only fill 5 frames at 8 fps (span 13); 40-frame clips fill 13 frames (span 37).
    assert [len(p) for p in ds.pools] == [3, 3, 6, 6]
    shapes = Counter()
    for batch in _take(build_loader(cfg, seed=0), 16):
        b, _, t, h, w = batch["video"].shape
        spec = next(s for s in buckets if (s.frames, s.height, s.width) == (t, h, w))
        assert b == spec.batch_size and batch["kind"] == ("image" if t == 1 else "video")
        shapes[(t, h, w)] += 1
        if t == 1:  # images go to the bucket of their own aspect ratio
            assert {m["width"] / m["height"] for m in batch["meta"]} == {64 / 48 if w > h else 32 / 64}
    assert len(shapes) == 4


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    good, good_meta = video_entry(24, 24.0)
    short, short_meta = video_entry(6, 24.0)
    with ShardWriter(tmp_path, prefix="bad-") as writer:
        for i in range(3):
            writer.write(f"good{i}", {"mp4": good}, good_meta)
        writer.write("corrupt", {"mp4": b"\x00\x01 not an mp4 " * 50}, good_meta)
        writer.write("cut", {"mp4": good[: len(good) // 2]}, good_meta)  # truncated file
        writer.write("short", {"mp4": short}, short_meta)  # 6 frames: 5 frames at 8 fps need 13
        writer.write("nofps", {"mp4": good}, {**good_meta, "fps": 0})
        writer.write("liar", {"mp4": short}, good_meta)  # meta promises 24 frames, the file has 6
        writer.write("nometa", {"mp4": good}, good_meta)
    meta_file = tmp_path / "bad-000000.meta.jsonl"
    meta_file.write_text("".join(l + "\n" for l in meta_file.read_text().splitlines() if "nometa" not in l))

    cfg = DataConfig(video_roots=str(tmp_path), image_prob=0.0, video_batch_size=2, **SMALL)
    with caplog.at_level(logging.WARNING, logger="infra.data"):
        loader = build_loader(cfg, seed=0)
        totals = SkipTotals(loader.dataset.index_skips)
        batches = _take(loader, 8)  # 6 usable-looking samples, 12 slots: every bad one is met
        for batch in batches:
            assert batch["video"].shape == (2, 3, 5, 32, 32)
            assert all(m["key"].startswith("good") for m in batch["meta"])
            totals.update(batch)
    assert loader.dataset.index_skips == {"missing_meta": 1, "zero_fps": 1, "too_short": 1}
    counts = totals.as_dict()
    assert counts["unreadable"] >= 2 and counts["truncated"] >= 1  # corrupt + cut, liar
    messages = " ".join(r.getMessage() for r in caplog.records)
    for reason in ("missing_meta", "zero_fps", "too_short", "unreadable", "truncated"):
        assert reason in messages

    # Worker processes report their skips through the batches: the totals do not depend on the worker count.
    cfg.num_workers = 2
    loader = build_loader(cfg, seed=0)
    with_workers = SkipTotals(loader.dataset.index_skips)
    for batch, again in zip(batches, _take(loader, 8)):
        assert batch["skips"] == again["skips"] and batch_keys(batch) == batch_keys(again)
        with_workers.update(again)
    assert with_workers.as_dict() == counts


def test_all_bad_data_fails_loudly(tmp_path):
    _, meta = video_entry(24, 24.0)
    with ShardWriter(tmp_path) as writer:
        writer.write("corrupt", {"mp4": b"garbage" * 100}, meta)
    cfg = DataConfig(video_roots=str(tmp_path), image_prob=0.0, **SMALL)
    with pytest.raises(RuntimeError, match="could not be used"):
        _take(build_loader(cfg), 1)


def test_images_need_no_meta_file_and_are_bucketed_by_their_header(tmp_path):
    write_image_shards(tmp_path, num_samples=6, sizes=((48, 64), (64, 32)))
    for meta_file in tmp_path.glob("*.meta.jsonl"):
        meta_file.unlink()
    buckets = [BucketConfig(1, 24, 32, 3), BucketConfig(1, 32, 16, 3)]
    cfg = DataConfig(image_roots=str(tmp_path), image_prob=1.0, buckets=buckets, **SMALL)
    ds = ShardBatchDataset(cfg)
    assert ds.index_skips == {}
    wide = {f"i{i:04d}" for i in range(0, 6, 2)}  # 64 wide x 48 high
    assert {ds.records[i].key for i in ds.pools[0]} == wide
    for batch in _take(build_loader(cfg), 2):
        assert set(batch_keys(batch)) == (wide if batch["video"].shape[-1] == 32 else {f"i{i:04d}" for i in (1, 3, 5)})
        assert batch["meta"][0]["source_size"] in ([64, 48], [32, 64])


def test_a_weighted_root_is_drawn_that_many_times_as_often(videos, tmp_path):
    """``root*N`` lists a root's samples N times: over whole epochs each of its samples is drawn N times as often
    as a sample of an unweighted root (a few real clips beside a large generated set)."""
    from infra.data.config import split_roots, weighted_roots

    assert weighted_roots(" a, b*3,, /x/c.tar*12 , d*e") == [("a", 1), ("b", 3), ("/x/c.tar", 12), ("d*e", 1)]
    assert split_roots("a, b*3") == ["a", "b"]
    few = write_video_shards(tmp_path / "few", num_samples=2, per_shard=2)
    cfg = DataConfig(video_roots=f"{videos},{few}*3", image_prob=0.0, video_batch_size=1, **SMALL)
    # One epoch: 8 samples once + 2 samples three times = 14 batches of 1.
    drawn = Counter((m["shard"].startswith(str(few)), m["key"])
                    for batch in _take(build_loader(cfg, seed=5), 14) for m in batch["meta"])
    assert {count for (weighted, _), count in drawn.items() if not weighted} == {1} and len(drawn) == 10
    assert {count for (weighted, _), count in drawn.items() if weighted} == {3}


@pytest.mark.parametrize("roots", ["a*0", "*2"])
def test_a_root_weight_below_one_is_refused_naming_the_key(roots):
    with pytest.raises(ValueError, match=r"^data\.video_roots: a root is 'path' or 'path\*N' with N >= 1"):
        DataConfig(video_roots=roots, image_prob=0.0).validate("data")
