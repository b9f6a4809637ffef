import io
import json
import tarfile

import numpy as np
import pytest

from infra.data.synthetic import (
    COLORS, DIRECTIONS, MOTION_PHRASE, SHAPES, SyntheticConfig, background_is_safe, make_caption, make_sample, render,
    shape_coverage,
)
from tools.make_default_data import make_default_data

CFG = SyntheticConfig(width=64, height=64, frames=9, fps=8)


def _object_mask(frames: np.ndarray, rgb) -> np.ndarray:
    return np.all(np.abs(frames.astype(int) - np.asarray(rgb)) <= 2, axis=-1)


def test_samples_are_deterministic_and_distinct():
    a, cap_a, truth_a = make_sample(0, 3, CFG)
    b, cap_b, truth_b = make_sample(0, 3, CFG)
    c, _, _ = make_sample(0, 4, CFG)
    assert a.shape == (9, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and cap_a == cap_b and truth_a == truth_b
    assert not np.array_equal(a, c)
    trajectory = truth_a["trajectory"]
    assert len(trajectory) == 9 and trajectory[0] == [*truth_a["start"], truth_a["radius"][0]]
    assert trajectory[-1] == [*truth_a["end"], truth_a["radius"][1]]
    # The truth alone determines the pixels (a reward can re-render from the meta file).
    assert np.array_equal(render(json.loads(json.dumps(truth_a)), 64, 64, 9), a)
    # Captions and truths come without rendering, equal to what the full sample gives (the study's prompts).
    for index, video in ((3, True), (17, True), (5, False)):
        _, caption, truth = make_sample(0, index, CFG, video=video)
        assert make_caption(0, index, CFG, video=video) == (caption, truth)


def test_caption_states_the_truth_and_shape_stays_in_frame():
    for index in range(40):
        frames, text, truth = make_sample(1, index, CFG)
        assert truth["shape"] in text and truth["color"] in text and MOTION_PHRASE[truth["motion"]] in text
        assert truth["background"]["color"] in text
        assert background_is_safe(truth["background"]["colors"])
        mask = _object_mask(frames, truth["rgb"])
        assert mask.any(axis=(1, 2)).all(), "the shape's core is visible in every frame"
        # Never touching the border: the whole shape is inside the frame.
        assert not (mask[:, 0].any() or mask[:, -1].any() or mask[:, :, 0].any() or mask[:, :, -1].any())


def test_motion_follows_the_stated_direction():
    seen = set()
    for index in range(80):
        frames, _, truth = make_sample(2, index, CFG)
        mask = _object_mask(frames, truth["rgb"])
        ys, xs = np.nonzero(mask[0])
        ye, xe = np.nonzero(mask[-1])
        dx, dy = xe.mean() - xs.mean(), ye.mean() - ys.mean()
        growth = mask[-1].sum() / mask[0].sum()
        motion = truth["motion"]
        seen.add(motion)
        if motion in DIRECTIONS:
            ux, uy = DIRECTIONS[motion]
            assert dx * ux + dy * uy > 0.25 * 64 * np.hypot(ux, uy) * 0.9
            assert abs(dx * uy - dy * ux) < 3  # no sideways drift
        elif motion == "grow":
            assert growth > 2.5 and np.hypot(dx, dy) < 2
        elif motion == "shrink":
            assert growth < 0.4 and np.hypot(dx, dy) < 2
        else:
            assert motion == "still" and np.hypot(dx, dy) < 0.5 and abs(growth - 1) < 0.05
    assert len(seen) >= 8


def test_images_have_no_motion():
    frames, text, truth = make_sample(0, 0, CFG, video=False)
    assert frames.shape == (1, 64, 64, 3) and truth["motion"] is None and "moves" not in text


def test_shape_coverage_is_antialiased_and_areas_differ():
    areas = {}
    for shape in SHAPES:
        cover, (rows, cols) = shape_coverage(shape, 32.3, 31.6, 20.0, 64, 64)
        assert cover.min() >= 0 and cover.max() <= 1
        assert ((cover > 0.05) & (cover < 0.95)).any(), "edges are anti-aliased"
        areas[shape] = cover.sum()
    assert abs(areas["circle"] - np.pi * 400) < 2  # exact area of a radius-20 disc
    assert areas["star"] < areas["triangle"] < areas["square"] < areas["circle"]
    with pytest.raises(ValueError, match="shape"):
        shape_coverage("hexagon", 1, 1, 1, 4, 4)


def test_palette_colours_are_separable():
    rgb = np.array(list(COLORS.values())) / 255.0
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb))
    assert dist.min() > 0.3


@pytest.mark.parametrize("key,value", [("frames", 0), ("fps", 0.0), ("max_radius", 0.4), ("growth", 1.0),
                                       ("max_travel", 2.0), ("shapes", ("circle", "hexagon")), ("colors", ()),
                                       ("motions", ("left", "left")), ("textures", ("plain",))])
def test_config_validation_names_the_key(key, value):
    cfg = SyntheticConfig(**{key: value})
    with pytest.raises(ValueError, match=key):
        cfg.validate()
    with pytest.raises(ValueError, match=rf"^data\.default\.[a-z_/]*{key}"):  # inside a run config: the full key
        cfg.validate("data.default")


def _read_tar(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_make_default_data_writes_shards_and_is_idempotent(tmp_path):
    import av

    out = tmp_path / "data"
    make_default_data(out, num_videos=5, num_images=3, size=32, frames=5, fps=4, seed=7, shard_size=3,
                      show_progress=False)
    videos, images = sorted(out.glob("video-*.tar")), sorted(out.glob("image-*.tar"))
    assert [p.name for p in videos] == ["video-000000.tar", "video-000001.tar"]
    assert [p.name for p in images] == ["image-000000.tar"]
    members = _read_tar(videos[0])
    assert sorted(members) == sorted(f"v000000{i}.{ext}" for i in range(3) for ext in ("mp4", "id", "txt"))
    meta = [json.loads(line) for p in videos for line in p.with_suffix(".meta.jsonl").read_text().splitlines()]
    assert [m["key"] for m in meta] == [f"v000000{i}" for i in range(5)]
    first = meta[0]
    assert first["fps"] == 4 and first["duration"] == 1.25 and first["width"] == first["height"] == 32
    assert first["caption"] == members["v0000000.txt"].decode()
    assert first["truth"]["shape"] in SHAPES and first["truth"]["motion"] is not None
    with av.open(io.BytesIO(members["v0000000.mp4"])) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == (5, 32, 32, 3)
    expected, _, _ = make_sample(7, 0, SyntheticConfig(width=32, height=32, frames=5, fps=4))
    assert np.abs(decoded.astype(float) - expected).mean() < 12  # lossy H.264, but the same picture
    image_meta = json.loads(images[0].with_suffix(".meta.jsonl").read_text().splitlines()[0])
    assert image_meta["truth"]["motion"] is None and "i0000000.jpg" in _read_tar(images[0])

    # Complete: a second call changes nothing.
    stamp = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    make_default_data(out, num_videos=5, num_images=3, size=32, frames=5, fps=4, seed=7, shard_size=3,
                      show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    # Interrupted: a missing shard is rebuilt identically, the others are kept.
    (out / "manifest.json").unlink()
    lost = videos[1].read_bytes()
    videos[1].unlink()
    make_default_data(out, num_videos=5, num_images=3, size=32, frames=5, fps=4, seed=7, shard_size=3,
                      show_progress=False)
    assert videos[0].stat().st_mtime_ns == stamp[videos[0]]
    assert _read_tar(videos[1]).keys() == set(tarfile.open(fileobj=io.BytesIO(lost)).getnames())
    # Other arguments into the same folder are refused instead of mixing two sets.
    with pytest.raises(ValueError, match="other arguments"):
        make_default_data(out, num_videos=5, num_images=3, size=32, frames=5, fps=4, seed=8, shard_size=3,
                          show_progress=False)


def test_large_shapes_must_leave_room_for_the_trip():
    # Radius 0.25 with a 0.55 trip along an axis cannot stay inside the frame: refused up front, not mid-draw.
    with pytest.raises(ValueError, match="max_travel"):
        SyntheticConfig(min_radius=0.2, max_radius=0.25).validate()
    SyntheticConfig(min_radius=0.16, max_radius=0.2, min_travel=0.35, max_travel=0.5).validate()


def test_class_subsets_restrict_what_is_drawn_and_reach_the_manifest(tmp_path):
    scene = dict(shapes=["circle", "square"], colors=["red"], motions=["left", "still"], textures=["gradient"],
                 min_radius=0.16, max_radius=0.2, min_travel=0.35, max_travel=0.5)
    cfg = SyntheticConfig(width=32, height=32, frames=3, **{k: tuple(v) if isinstance(v, list) else v
                                                             for k, v in scene.items()})
    truths = [make_sample(0, i, cfg)[2] for i in range(40)]
    assert {t["shape"] for t in truths} == {"circle", "square"} and {t["color"] for t in truths} == {"red"}
    assert {t["motion"] for t in truths} == {"left", "still"}
    assert {t["background"]["texture"] for t in truths} == {"gradient"}
    assert all(0.16 <= t["radius"][0] <= 0.2 for t in truths)
    # The default classes draw what they drew before subsets existed (same random stream; recorded then).
    truth = make_sample(0, 3, SyntheticConfig(width=32, height=32, frames=3))[2]
    assert (truth["shape"], truth["color"], truth["motion"], truth["start"], truth["background"]["texture"]) == \
        ("circle", "white", "left", [0.8358, 0.2236], "stripes")
    out = tmp_path / "data"
    make_default_data(out, num_videos=2, num_images=0, size=32, frames=3, show_progress=False, **scene)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["colors"] == ["red"] and manifest["config"]["max_radius"] == 0.2
    make_default_data(out, num_videos=2, num_images=0, size=32, frames=3, show_progress=False, **scene)  # done: no-op
    with pytest.raises(ValueError, match="unknown scene option"):
        make_default_data(tmp_path / "other", num_videos=1, num_images=0, size=32, frames=3, shape="circle")
