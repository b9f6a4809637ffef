"""Malformed shards, meta lines, images and captions: each is skipped and counted under a reason naming the shard
and line, or corrected and counted; none stops training and none gives silently wrong data."""
import io
import json
import tarfile

import numpy as np
import pytest

from infra.data.config import BucketConfig, DataConfig
from infra.data.dataset import MAX_CAPTION_CHARS, ShardBatchDataset, build_loader, load_or_skip, ClipRequest
from infra.data.decode import NoVideoStream, decode_image, open_video
from infra.data.shard_index import ShardReader, index_shards, meta_path, read_meta
from infra.data.skips import SkipCounter, skip_logs
from test_data_helpers import frame_index_of, video_entry, write_video_shards


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _video_shard(tmp_path, meta_lines: list, members=None, name="s-000000.tar"):
    data, meta = video_entry(9, 8.0)
    _tar(tmp_path / name, members or {"a.mp4": data, "b.mp4": data})
    path = meta_path(tmp_path / name)
    lines = []
    for line in meta_lines:
        lines.append(line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return tmp_path / name, meta


@pytest.mark.parametrize("bad_line", [b"{not json", b'{"duration": 1.0, "fps": 8}', b"[1, 2, 3]", b'"a"',
                                      b'{"key": "b", "caption": "\xff\xfe bad"}'],
                         ids=["not_json", "no_key", "json_list", "json_string", "not_utf8"])
def test_a_bad_meta_line_is_skipped_counted_and_named_the_rest_still_read(tmp_path, bad_line, caplog):
    _, meta = video_entry(9, 8.0)
    shard, _ = _video_shard(tmp_path, [{"key": "a", **meta}, bad_line])
    skips = SkipCounter(interval_s=0)
    with caplog.at_level("WARNING", logger="infra.data"):
        metas = read_meta(shard, skips)
    assert list(metas) == ["a"]
    assert skips.counts == {"bad_meta_line": 1}
    assert f"{meta_path(shard)}:2" in caplog.text  # the file and the line number
    records = index_shards(str(shard), "video", skips)
    assert [r.key for r in records] == ["a"]  # b has no usable meta line: counted as missing, not a crash
    assert skips.counts["missing_meta"] == 1


def test_a_truncated_tar_keeps_its_whole_members_and_counts_the_cut_one(tmp_path):
    data, meta = video_entry(9, 8.0)
    shard, _ = _video_shard(tmp_path, [{"key": k, **meta} for k in ("a", "b", "c")],
                            {"a.mp4": data, "b.mp4": data, "c.mp4": data})
    raw = shard.read_bytes()
    shard.write_bytes(raw[: 512 + len(data) + 512 + len(data) // 2])  # a whole, then half of b
    skips = SkipCounter()
    records = index_shards(str(shard), "video", skips)
    assert [r.key for r in records] == ["a"]
    assert skips.counts["unreadable_shard"] == 1
    # A record whose bytes vanished after indexing (the file cut later) is an unreadable sample, not a crash.
    shard.write_bytes(raw[:600])
    request = ClipRequest(frames=4, height=32, width=32, fps=8.0)
    assert load_or_skip(records[0], request, ShardReader(), "pyav", skips) is None
    assert skips.counts["unreadable"] == 1


def test_training_goes_on_over_every_crashing_input_and_counts_it(tmp_path):
    """The five inputs that crashed the loader, together in one data set beside good shards."""
    good = write_video_shards(tmp_path / "good", 4, num_frames=9, fps=8.0, per_shard=4)
    data, meta = video_entry(9, 8.0)
    bad = tmp_path / "bad"
    bad.mkdir()
    _video_shard(bad, [{"key": "a", **meta}, {"key": "b", **meta}], name="cut-000000.tar")
    (bad / "cut-000000.tar").write_bytes((bad / "cut-000000.tar").read_bytes()[:700])
    _video_shard(bad, [b"{oops", {"key": "b", **meta}], name="json-000000.tar")
    _video_shard(bad, [{"fps": 8}, {"key": "b", **meta}], name="nokey-000000.tar")
    _video_shard(bad, [b"[]", {"key": "b", **meta}], name="list-000000.tar")
    _video_shard(bad, [b"\xff\xfe\x00", {"key": "b", **meta}], name="utf-000000.tar")
    cfg = DataConfig(video_roots=f"{good},{bad}", num_frames=5, height=32, width=32, fps=8.0, video_batch_size=2,
                     image_prob=0.0, num_workers=0)
    loader = build_loader(cfg)
    dataset = loader.dataset
    assert dataset.index_skips["bad_meta_line"] == 4
    assert dataset.index_skips["unreadable_shard"] == 1
    batches = [b for _, b in zip(range(6), loader)]
    assert all(b["video"].shape == (2, 3, 5, 32, 32) for b in batches)
    logs = skip_logs(batches[0])
    assert logs["data/index_skipped_bad_meta_line"] == 4.0  # the first batch reports indexing's skips to the metrics
    assert not any(k.startswith("data/index_") for b in batches[1:] for k in skip_logs(b))


def test_the_stream_fps_wins_over_a_wrong_meta_fps_and_the_disagreement_is_counted(tmp_path):
    data, meta = video_entry(16, 8.0)
    for wrong in (0.5, 4.0):
        folder = tmp_path / str(wrong)
        folder.mkdir()
        shard, _ = _video_shard(folder, [{"key": "a", **meta, "fps": wrong, "duration": 2.0}], {"a.mp4": data})
        skips = SkipCounter()
        (record,) = index_shards(str(shard), "video", skips)
        request = ClipRequest(frames=8, height=32, width=32, fps=8.0)
        video, _, out_meta = load_or_skip(record, request, ShardReader(), "pyav", skips)
        assert skips.counts == {"fps_mismatch": 1}
        assert out_meta["source_fps"] == pytest.approx(8.0)
        # 8 consecutive source frames at the stream's own rate: no repeated or doubled frames.
        indices = [frame_index_of(video[:, t]) for t in range(8)]
        assert np.diff(indices).tolist() == [1] * 7


@pytest.mark.parametrize("mode,pixels,expected", [
    ("I;16", np.full((8, 8), 32768, np.uint16), 128),
    ("I", np.full((8, 8), 2**30, np.int32), 128),
    ("F", np.full((8, 8), 0.5, np.float32), 128),
    ("L", np.full((8, 8), 77, np.uint8), 77),
])
def test_wide_images_are_scaled_to_8_bits_not_clipped(mode, pixels, expected):
    from PIL import Image

    image = Image.fromarray(pixels, mode=mode) if mode != "I;16" else Image.frombytes("I;16", (8, 8), pixels.tobytes())
    buf = io.BytesIO()
    image.save(buf, format="TIFF" if mode in ("I", "F") else "PNG")
    frames = decode_image(buf.getvalue())
    assert frames.shape == (1, 8, 8, 3) and frames.dtype == np.uint8
    assert abs(int(frames.mean()) - expected) <= 1


def test_a_sixteen_bit_png_gradient_keeps_its_range():
    from PIL import Image

    ramp = np.linspace(0, 65535, 64).astype(np.uint16)[None].repeat(4, 0)
    buf = io.BytesIO()
    Image.frombytes("I;16", (64, 4), ramp.tobytes()).save(buf, format="PNG")
    frames = decode_image(buf.getvalue())
    assert frames[0, 0, 0, 0] <= 1 and frames[0, 0, -1, 0] >= 254 and 120 < frames.mean() < 135


def test_a_key_with_dots_is_kept_whole(tmp_path):
    data, meta = video_entry(9, 8.0)
    shard, _ = _video_shard(tmp_path, [{"key": "clip.v2", **meta}], {"clip.v2.mp4": data, "clip.v2.txt": b"hi"})
    skips = SkipCounter()
    (record,) = index_shards(str(shard), "video", skips)
    assert record.key == "clip.v2" and set(record.files) == {"mp4", "txt"} and not skips.counts


def test_bad_captions_are_kept_repaired_and_counted(tmp_path):
    data, meta = video_entry(9, 8.0)
    shard, _ = _video_shard(tmp_path, [{"key": "a", **meta}, {"key": "b", **meta}],
                            {"a.mp4": data, "a.txt": b"caf\xe9 au lait", "b.mp4": data,
                             "b.txt": b"x" * (MAX_CAPTION_CHARS + 10)})
    skips = SkipCounter()
    records = index_shards(str(shard), "video", skips)
    request = ClipRequest(frames=4, height=32, width=32, fps=8.0)
    (_, cap_a, _), (_, cap_b, _) = (load_or_skip(r, request, ShardReader(), "pyav", skips) for r in records)
    assert cap_a == "caf\ufffd au lait" and len(cap_b) == MAX_CAPTION_CHARS
    assert skips.counts == {"bad_caption": 2}


def test_an_audio_only_mp4_is_named_as_such(tmp_path):
    av = pytest.importorskip("av")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(NoVideoStream, match="no video stream.*audio"):
        open_video(buf.getvalue(), "pyav")
    _, meta = video_entry(9, 8.0)
    shard, _ = _video_shard(tmp_path, [{"key": "a", **meta}], {"a.mp4": buf.getvalue()})
    skips = SkipCounter(interval_s=0)
    (record,) = index_shards(str(shard), "video", skips)
    assert load_or_skip(record, ClipRequest(frames=4, height=32, width=32, fps=8.0), ShardReader(), "pyav",
                        skips) is None
    assert skips.counts == {"unreadable": 1}
