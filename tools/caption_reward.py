"""Caption-faithfulness reward for clips of the synthetic default data set (``infra.data.synthetic``).

From a video alone the reward recovers which colour, which shape and which motion it shows, and compares them with
the ground truth (``truth``) its caption was made from. No model is involved: it is cheap, deterministic and needs
no download.

- **Colour**: every pixel (after a 3x3 box blur against noise) goes to its nearest foreground palette colour if it
  is within ``tau`` of it (RGB in [0, 1], Euclidean); the palette colour with most such pixels over the clip is the
  answer. Backgrounds of the data set keep ``MIN_BACKGROUND_DISTANCE`` (0.3) away from every palette colour, so
  ``tau`` starts at 0.2 and is only relaxed (0.3, 0.4) for degraded clips where nothing was found.
- **Shape**: per frame, around the largest connected region of that colour, the object's opacity is estimated from
  the colour distance (``object_alpha``) and compared with each shape's template of the same area and centroid,
  blurred by each of ``BLURS`` (generated clips are blurred by an unknown amount); the shape with the smallest mean
  relative squared error over frames wins.
- **Motion**: the region's centroid and log-area are fitted linearly against time. A displacement of at least
  ``MIN_TRAVEL`` (fraction of the frame side) gives one of 8 directions (45 degree sectors), otherwise the log-area
  change decides between grow, shrink (area ratio beyond ``GROWTH_RATIO``) and still.

Each attribute scores 1 when it matches the truth and 0 otherwise; ``total`` is their mean (images have no motion:
the mean of shape and colour). Anything not found scores 0, so blurred, noisy or empty clips degrade towards 0 instead
of failing. With truths shuffled among clips, the expected score is the chance level ``sum_k p_k^2`` per attribute
(``chance_level``); for the uniform draws of the default set that is 1/5 (shape), 1/8 (colour), 1/11 (motion),
0.139 in total.

CLI: score a folder of ``<key>.mp4`` files (or of shards) against meta files holding ``truth``:

    python -m tools.caption_reward --videos samples/ --meta data/default --out reward.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
from scipy import ndimage

from infra.data.synthetic import COLORS, DIRECTIONS, SHAPES, shape_coverage

PALETTE_NAMES = tuple(COLORS)
PALETTE = np.asarray([COLORS[name] for name in PALETTE_NAMES], dtype=np.float32) / 255.0
TAUS = (0.2, 0.3, 0.4)
MIN_AREA = 0.002  # smallest region counted as the object, fraction of the frame's pixels
MIN_TRAVEL = 0.12
GROWTH_RATIO = 1.6
MAX_SIDE = 128  # larger clips are box-downsampled to about this side first
MAX_FRAMES = 17  # frames analysed, evenly spaced over the clip
SHAPE_FRAMES = 9  # of those, frames used for the (more costly) shape vote
BLURS = (0.0, 1.0, 2.0, 3.0, 4.5)  # Gaussian blurs (pixels, at MAX_SIDE) tried on shape templates
ATTRIBUTES = ("shape", "color", "motion")


# ---------------------------------------------------------------------------------------------------------- input
def read_video(source: str | os.PathLike | bytes) -> np.ndarray:
    """Decode an mp4 (path or bytes) to uint8 frames (T, H, W, 3)."""
    from infra.data.decode import decode_all

    return decode_all(source if isinstance(source, bytes) else Path(source).read_bytes())


def to_frames(video) -> np.ndarray:
    """float32 (T, H, W, 3) in [0, 1] from a (3, T, H, W) float tensor/array in [-1, 1] or uint8 (T, H, W, 3)."""
    if hasattr(video, "detach"):  # torch tensor, without importing torch here
        video = video.detach().float().cpu().numpy() if video.is_floating_point() else video.cpu().numpy()
    video = np.asarray(video)
    if video.dtype == np.uint8:
        if video.ndim == 3:
            video = video[None]
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"uint8 video must be (T, H, W, 3), got {video.shape}")
        frames = video.astype(np.float32) / 255.0
    elif np.issubdtype(video.dtype, np.floating):
        if video.ndim != 4 or video.shape[0] != 3:
            raise ValueError(f"float video must be (3, T, H, W) in [-1, 1], got {video.shape}")
        frames = np.clip((video.transpose(1, 2, 3, 0).astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)
    else:
        raise ValueError(f"video must be uint8 or floating point, got {video.dtype}")
    factor = max(frames.shape[1], frames.shape[2]) // MAX_SIDE
    if factor > 1:  # box-downsample: cheaper, and the object stays large enough to measure
        t, h, w, _ = frames.shape
        h, w = h // factor * factor, w // factor * factor
        frames = frames[:, :h, :w].reshape(t, h // factor, factor, w // factor, factor, 3).mean(axis=(2, 4))
    return frames


# ------------------------------------------------------------------------------------------------------ recovery
def _palette_labels(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box-blurred frames, and per pixel the nearest palette index and the distance to it."""
    smooth = ndimage.uniform_filter(frames, size=(1, 3, 3, 1), mode="nearest")
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2 as one matrix product: far cheaper than broadcasting differences.
    dist2 = (smooth**2).sum(-1, keepdims=True) - 2.0 * smooth @ PALETTE.T + (PALETTE**2).sum(-1)
    labels = dist2.argmin(axis=-1)
    return smooth, labels, np.sqrt(np.maximum(np.take_along_axis(dist2, labels[..., None], -1)[..., 0], 0.0))


def _largest_region(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


def object_alpha(frame: np.ndarray, color: np.ndarray, core: np.ndarray, margin: int = 6,
                 ) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Estimated opacity of the object around its core region, and the window (rows, cols) it covers.

    A blurred edge mixes the object's colour ``c`` with the background ``b``: ``x = a c + (1 - a) b``, so
    ``a = 1 - |x - c| / |b - c|``, with ``|b - c|`` taken as the median over a ring around the object. Left unclipped,
    the estimate averages to 0 on the background, so the opacity's sum and centroid (which blur preserves) estimate
    the object's area and centre without bias from noise.
    """
    near = ndimage.binary_dilation(core, iterations=margin)
    ring = near & ~ndimage.binary_dilation(core, iterations=margin // 2)
    dist = np.linalg.norm(frame - color, axis=-1)
    background = float(np.median(dist[ring])) if ring.any() else float(np.median(dist))
    rows, cols = ndimage.find_objects(near.astype(np.int32))[0]
    alpha = np.where(near[rows, cols], 1.0 - dist[rows, cols] / max(background, 1e-3), 0.0)
    return alpha, (rows, cols)


def _unit_templates(resolution: int = 256) -> dict[str, tuple[float, float, float]]:
    """Area and centroid offset (x, y) of each shape at radius 1, measured on a fine grid."""
    out = {}
    r = resolution / 2 - 2
    for shape in SHAPES:
        cover, (rows, cols) = shape_coverage(shape, resolution / 2, resolution / 2, r, resolution, resolution)
        ys, xs = np.mgrid[rows, cols] + 0.5
        area = cover.sum()
        out[shape] = (area / r**2, ((xs * cover).sum() / area - resolution / 2) / r,
                      ((ys * cover).sum() / area - resolution / 2) / r)
    return out


_TEMPLATES = _unit_templates()


def shape_errors(alpha: np.ndarray) -> dict[str, float]:
    """How badly each shape explains an opacity map: relative squared error of the best blurred template.

    Each template has the opacity's area and centroid; it is blurred by each of ``BLURS`` (pixels) because generated
    clips are blurred by an unknown amount and blur turns every small shape into a disc.
    """
    area = float(alpha.sum())
    if area <= 1.0:
        return {shape: 1.0 for shape in SHAPES}
    ys, xs = np.mgrid[0:alpha.shape[0], 0:alpha.shape[1]] + 0.5
    cy, cx = (ys * alpha).sum() / area, (xs * alpha).sum() / area
    norm = float((alpha**2).sum())
    out = {}
    for shape, (unit_area, ox, oy) in _TEMPLATES.items():
        radius = math.sqrt(area / unit_area)
        cover, (rows, cols) = shape_coverage(shape, cx - ox * radius, cy - oy * radius, radius, *alpha.shape)
        template = np.zeros_like(alpha)
        template[rows, cols] = cover
        blurred = (ndimage.gaussian_filter(template, sigma) if sigma else template for sigma in BLURS)
        out[shape] = min(float(((b - alpha) ** 2).sum()) / norm for b in blurred)
    return out


def classify_motion(centroids: np.ndarray, areas: np.ndarray, times: np.ndarray) -> str:
    """Motion class from per-frame centroids (fractions of the side), areas and times in [0, 1]."""
    dx, dy = np.polyfit(times, centroids[:, 0], 1)[0], np.polyfit(times, centroids[:, 1], 1)[0]
    if math.hypot(dx, dy) >= MIN_TRAVEL:
        angle = math.atan2(dy, dx)
        return min(DIRECTIONS, key=lambda name: abs(math.remainder(
            angle - math.atan2(DIRECTIONS[name][1], DIRECTIONS[name][0]), math.tau)))
    growth = np.polyfit(times, np.log(areas), 1)[0]
    if growth > math.log(GROWTH_RATIO):
        return "grow"
    if growth < -math.log(GROWTH_RATIO):
        return "shrink"
    return "still"


def recover(video) -> dict:
    """What a clip shows: ``{"color", "shape", "motion"}``, each a class name or None when not found.

    ``motion`` is None for single frames. Extra keys: ``tau`` used, ``shape_error`` per shape.
    """
    return _recover_frames(to_frames(video))


def _recover_frames(frames: np.ndarray) -> dict:
    t, h, w, _ = frames.shape
    # Times in [0, 1] of the analysed frames.
    picked = np.unique(np.round(np.linspace(0, t - 1, min(t, MAX_FRAMES))).astype(int))
    frames, times = frames[picked], picked / max(t - 1, 1)
    smooth, labels, dist = _palette_labels(frames)
    min_pixels = max(MIN_AREA * h * w, 4.0)
    found = {"color": None, "shape": None, "motion": None, "tau": None, "shape_error": {}}
    for tau in TAUS:
        counts = np.bincount(labels[dist < tau], minlength=len(PALETTE_NAMES))
        if counts.max() >= min_pixels * len(picked):
            break
    else:
        return found
    color = int(counts.argmax())
    found.update(color=PALETTE_NAMES[color], tau=tau)

    regions = [_largest_region(frame) for frame in (labels == color) & (dist < tau)]
    valid = [i for i, region in enumerate(regions) if region.sum() >= min_pixels]
    if not valid:
        return found
    picks = [valid[int(round(j))] for j in np.linspace(0, len(valid) - 1, min(SHAPE_FRAMES, len(valid)))]
    errors = [shape_errors(object_alpha(smooth[i], PALETTE[color], regions[i])[0]) for i in picks]
    mean_error = {shape: float(np.mean([e[shape] for e in errors])) for shape in SHAPES}
    found.update(shape=min(mean_error, key=mean_error.get), shape_error=mean_error)

    # Motion needs the object in at least half the frames, spread over time.
    if t > 1 and len(valid) >= max(2, len(picked) // 2):
        side = max(h, w)
        centroids = np.array([[xs.mean(), ys.mean()] for ys, xs in (np.nonzero(regions[i]) for i in valid)]) / side
        areas = np.array([regions[i].sum() for i in valid], dtype=np.float64)
        found["motion"] = classify_motion(centroids, areas, times[valid])
    return found


# ------------------------------------------------------------------------------------------------------- scoring
def score_video(video, truth: dict) -> dict:
    """Agreement of a clip with its ground truth: ``{"shape", "color", "motion", "total", "pred"}``, scores in [0, 1].

    ``motion`` is None (and left out of ``total``) when the truth has no motion (images) or the clip is one frame.
    """
    frames = to_frames(video)
    pred = _recover_frames(frames)
    scores = {"shape": float(pred["shape"] == truth["shape"]), "color": float(pred["color"] == truth["color"])}
    has_motion = truth.get("motion") is not None and frames.shape[0] > 1
    scores["motion"] = float(pred["motion"] == truth["motion"]) if has_motion else None
    present = [v for v in scores.values() if v is not None]
    scores["total"] = float(np.mean(present))
    scores["pred"] = {k: pred[k] for k in ATTRIBUTES}
    return scores


def chance_level(truths: list[dict]) -> dict:
    """Expected scores when truths are shuffled among the clips: ``sum_k p_k^2`` per attribute (and total)."""
    out = {}
    for attribute in ATTRIBUTES:
        labels = [t[attribute] for t in truths if t.get(attribute) is not None]
        out[attribute] = sum((c / len(labels)) ** 2 for c in Counter(labels).values()) if labels else None
    out["total"] = float(np.mean([v for v in out.values() if v is not None]))
    return out


def summarize(per_video: list[dict], truths: list[dict]) -> dict:
    """Means over the clips where each attribute applies, with the chance level of ``truths``."""
    mean = {}
    for attribute in (*ATTRIBUTES, "total"):
        values = [s[attribute] for s in per_video if s[attribute] is not None]
        mean[attribute] = float(np.mean(values)) if values else None
    return {"count": len(per_video), "mean": mean, "chance": chance_level(truths), "per_video": per_video}


def score_batch(videos, truths: list[dict], keys: list[str] | None = None) -> dict:
    """Score clips against truths: ``{"count": n, "mean": {...}, "chance": {...}, "per_video": [...]}``.

    ``videos`` is any iterable of clips (a (B, 3, T, H, W) tensor iterates over its clips).
    """
    per_video = [{"key": keys[i] if keys else str(i), **score_video(video, truth)}
                 for i, (video, truth) in enumerate(zip(videos, truths, strict=True))]
    return summarize(per_video, truths)


# ----------------------------------------------------------------------------------------------------------- CLI
def load_truths(meta: str | os.PathLike) -> dict[str, dict]:
    """``{key: truth}`` from a ``.meta.jsonl`` file or every such file in a folder."""
    meta = Path(meta)
    files = sorted(meta.glob("*.meta.jsonl")) if meta.is_dir() else [meta]
    truths = {}
    for path in files:
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if "truth" in record:
                    truths[record["key"]] = record["truth"]
    return truths


def iter_mp4s(folder: str | os.PathLike):
    """(key, mp4 bytes) for ``<key>.mp4`` files in a folder, or for the mp4 members of its ``.tar`` shards."""
    folder = Path(folder)
    for path in sorted(folder.glob("*.mp4")):
        yield path.stem, path.read_bytes()
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".mp4"):
                    yield member.name.rsplit("/", 1)[-1][: -len(".mp4")], tar.extractfile(member).read()


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description="Score generated clips of the synthetic set against their truth.")
    parser.add_argument("--videos", required=True, help="folder of <key>.mp4 files or of .tar shards")
    parser.add_argument("--meta", required=True, help=".meta.jsonl file or folder of them, with 'truth' per key")
    parser.add_argument("--out", help="JSON output path (default: print)")
    args = parser.parse_args(argv)
    truths = load_truths(args.meta)
    per_video, matched, missing = [], [], 0
    # Scored as they are decoded: a large folder never sits in memory.
    for key, data in tqdm(iter_mp4s(args.videos), desc="caption reward", unit="video"):
        if key not in truths:
            missing += 1
            continue
        matched.append(truths[key])
        per_video.append({"key": key, **score_video(read_video(data), truths[key])})
    result = summarize(per_video, matched)
    result["videos_without_truth"] = missing
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(json.dumps({"count": result["count"], "mean": result["mean"], "chance": result["chance"]}))
    else:
        print(text)


if __name__ == "__main__":
    main()
