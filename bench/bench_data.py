"""Video decoding throughput for the data pipeline: decord vs PyAV vs decoding the whole clip.

    python -m bench.bench_data [SHARD_ROOT] [--frames 17] [--fps 8] [--size 256] [--repeats 2]

For every clip of the shards, cut ``frames`` frames at ``fps`` from a random start, resize and centre-crop to
``size``: once decoding only the needed frames (decord, PyAV) and once decoding every frame of the clip then picking
(decord, PyAV). Prints JSON: clips per second and frames decoded per second (frames the decoder returned; for the
whole-clip methods every frame of the clip) for each method, from each clip's median time over the repeats. Run single-threaded (OMP_NUM_THREADS=1, decoder threads
1), as a DataLoader worker is.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from infra.data.buckets import frame_offsets, frame_span, start_frame
from infra.data.decode import open_video
from infra.data.shard_index import ShardReader, index_shards
from infra.data.skips import SkipCounter
from infra.data.transforms import frames_to_tensor

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ssvae_example"


def _clip(data: bytes, decoder: str, whole: bool, indices: list[int], size: int) -> int:
    """Decode, cut and transform one clip; returns the frames the decoder produced."""
    source = open_video(data, decoder)
    if whole:
        every = source.get_all()
        frames = every[indices]
        decoded = len(every)
    else:
        frames = source.get(indices)
        decoded = len(frames)
    frames_to_tensor(frames, size, size)
    return decoded


def bench(root: str, frames: int, fps: float, size: int, repeats: int, seed: int = 0) -> dict:
    records = index_shards(root, "video", SkipCounter())
    reader = ShardReader()
    rng = np.random.default_rng(seed)
    clips = []
    for record in records:
        source_fps = float(record.meta["fps"])
        span = frame_span(frames, source_fps, fps)
        if record.num_frames < span:
            continue
        start = start_frame(rng.random(), record.num_frames, span)
        indices = [start + o for o in frame_offsets(frames, source_fps, fps)]
        clips.append((reader.read(record, "mp4"), indices))
    if not clips:
        raise SystemExit(f"no clip in {root} is long enough for {frames} frames at {fps} fps")

    installed = [d for d, module in (("decord", "decord"), ("pyav", "av")) if importlib.util.find_spec(module)]
    if not installed:
        raise SystemExit("neither decord nor PyAV is installed: nothing to decode with")
    methods = {f"{d}{suffix}": (d, whole) for whole, suffix in ((False, ""), (True, "_whole_clip"))
               for d in installed}
    for decoder, whole in methods.values():
        _clip(clips[0][0], decoder, whole, clips[0][1], size)  # warm-up (library loading)
    # Methods take turns clip by clip, so load from other processes hits them alike; each clip's median time counts.
    times = {name: np.zeros((repeats, len(clips))) for name in methods}
    decoded = {name: 0 for name in methods}
    for r in range(repeats):
        for c, (data, indices) in enumerate(clips):
            for name, (decoder, whole) in methods.items():
                t0 = time.perf_counter()
                n = _clip(data, decoder, whole, indices, size)
                times[name][r, c] = time.perf_counter() - t0
                decoded[name] += n / repeats
    results = {}
    for name in methods:
        elapsed = float(np.median(times[name], axis=0).sum())
        results[name] = {"clips_per_s": round(len(clips) / elapsed, 3),
                         "frames_decoded_per_s": round(decoded[name] / elapsed, 1),
                         "ms_per_clip": round(1000 * elapsed / len(clips), 1)}
    return {
        "root": str(root), "clips": len(clips), "repeats": repeats, "frames": frames, "fps": fps, "size": size,
        "source_size": list(open_video(clips[0][0], installed[0]).get([0]).shape[1:3][::-1]),
        "decoders_missing": sorted({"decord", "pyav"} - set(installed)),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=str(DEFAULT_ROOT), help="shard folder(s) or tar(s), comma separated")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print(json.dumps(bench(args.root, args.frames, args.fps, args.size, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
