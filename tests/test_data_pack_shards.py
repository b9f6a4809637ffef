import json

import pytest

from infra.data.config import DataConfig
from infra.data.dataset import build_loader
from infra.data.shard_index import index_shards
from infra.data.skips import SkipCounter
from test_data_helpers import video_entry
from tools.pack_shards import main, probe_video


def test_pack_folder_then_load(tmp_path, capsys):
    src, out = tmp_path / "videos", tmp_path / "shards"
    (src / "sub").mkdir(parents=True)
    data, _ = video_entry(30, 15.0)
    for name in ("a.clip", "b", "sub/c"):
        (src / f"{name}.mp4").write_bytes(data)
    (src / "b.txt").write_text("a grey ramp brightening\n")
    (src / "broken.mp4").write_bytes(b"not a video" * 10)
    (src / "notes.md").write_text("ignored")

    assert main([str(src), str(out), "--max-samples", "2", "--recursive", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 3 and list(summary["left_out"]) == [str(src / "broken.mp4")]
    assert sorted(p.name for p in out.iterdir()) == [
        "video-000000.meta.jsonl", "video-000000.tar", "video-000001.meta.jsonl", "video-000001.tar"]

    skips = SkipCounter()
    records = {r.key: r for r in index_shards(str(out), "video", skips)}
    assert skips.counts == {} and sorted(records) == ["a_clip", "b", "sub_c"]
    meta = records["b"].meta
    assert meta["fps"] == pytest.approx(15.0) and meta["duration"] == pytest.approx(2.0, abs=0.07)
    assert (meta["width"], meta["height"], meta["source"]) == (64, 64, "b.mp4")

    cfg = DataConfig(video_roots=str(out), image_prob=0.0, num_frames=5, fps=5.0, height=32, width=32,
                     video_batch_size=3)
    batch = next(iter(build_loader(cfg)))
    assert batch["video"].shape == (3, 3, 5, 32, 32)
    captions = dict(zip((m["key"] for m in batch["meta"]), batch["caption"]))
    assert captions == {"a_clip": "", "b": "a grey ramp brightening", "sub_c": ""}


def test_probe_refuses_non_video(tmp_path):
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(Exception):
        probe_video(bad)


def test_empty_folder_exits_nonzero(tmp_path, capsys):
    assert main([str(tmp_path), str(tmp_path / "out"), "--no-progress"]) == 1
    assert json.loads(capsys.readouterr().out)["samples"] == 0
