"""FVD between two sets of videos: ``python -m tools.fvd --real DIR|FILE... --fake DIR|FILE... [--out f.json]``.

Each video contributes up to ``--clips-per-video`` non-overlapping 16-frame clips (every ``--stride``-th
frame). Features are the Kinetics-400 I3D logits (``infra.metrics.fvd``), cached per clip under
``--cache-dir`` so a reference set is embedded once across runs. Prints (and optionally writes) JSON.
The reconstruction tool and the study call ``compute_fvd`` with their own lists of files or clips.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from infra.data.transforms import frames_to_tensor
from infra.footage import frame_count, read_frames
from infra.metrics.fvd import CLIP_FRAMES, FEATURE_VERSION, RESOLUTION, I3DFeatures, frechet_distance

VIDEO_SUFFIXES = (".mp4", ".mpg", ".mpeg", ".mov", ".mkv", ".webm", ".avi")


def collect_videos(items: Sequence[str | Path]) -> list[Path]:
    """Files named directly plus the video files inside named folders (sorted, not recursive)."""
    out: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            out += sorted(p for p in item.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        elif item.is_file():
            out.append(item)
        else:
            raise FileNotFoundError(f"{item} is neither a video file nor a folder")
    return out


def video_clips(path: Path, clips_per_video: int, stride: int = 1) -> list[torch.Tensor]:
    """Up to ``clips_per_video`` consecutive 16-frame clips (3, 16, H, W) in [-1, 1] from the start of a video."""
    span = CLIP_FRAMES * stride
    count = min(clips_per_video, frame_count(path) // span)
    if count == 0:
        return []
    video = frames_to_tensor(read_frames(path, range(0, count * span, stride)))
    return [video[:, i * CLIP_FRAMES:(i + 1) * CLIP_FRAMES] for i in range(count)]


def _features_of_files(files: list[Path], features: I3DFeatures, clips_per_video: int, stride: int):
    import numpy as np

    # one video at a time, so only one decoded video is in memory
    feats = [features(clips) for f in files if (clips := video_clips(f, clips_per_video, stride))]
    return np.concatenate(feats) if feats else np.zeros((0, 400))


def compute_fvd(real: Sequence[str | Path], fake: Sequence[str | Path], clips_per_video: int = 1, stride: int = 1,
                features: I3DFeatures | None = None) -> dict:
    """FVD between the videos (files or folders) in ``real`` and ``fake``, with the counts used."""
    features = features if features is not None else I3DFeatures()
    real_feats = _features_of_files(collect_videos(real), features, clips_per_video, stride)
    fake_feats = _features_of_files(collect_videos(fake), features, clips_per_video, stride)
    for name, f in (("real", real_feats), ("fake", fake_feats)):
        if len(f) < 2:
            raise ValueError(f"FVD needs at least 2 {name} clips of {CLIP_FRAMES * stride} frames, found {len(f)}")
    return {"fvd": frechet_distance(real_feats, fake_feats), "num_real_clips": len(real_feats),
            "num_fake_clips": len(fake_feats), "clip_frames": CLIP_FRAMES, "stride": stride,
            "resolution": RESOLUTION, "features": FEATURE_VERSION, "computed_clips": features.computed}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--real", nargs="+", required=True, help="reference videos: files and/or folders")
    p.add_argument("--fake", nargs="+", required=True, help="generated or reconstructed videos: files and/or folders")
    p.add_argument("--clips-per-video", type=int, default=1)
    p.add_argument("--stride", type=int, default=1, help="take every n-th frame")
    p.add_argument("--cache-dir", default=None, help="folder for per-clip I3D features")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.clips_per_video < 1 or args.stride < 1 or args.batch_size < 1:
        p.error("--clips-per-video, --stride and --batch-size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None, features: I3DFeatures | None = None) -> dict:
    args = parse_args(argv)
    features = features or I3DFeatures(cache_dir=args.cache_dir, batch_size=args.batch_size, device=args.device)
    result = compute_fvd(args.real, args.fake, args.clips_per_video, args.stride, features)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
