"""Reconstruct videos through any first stage (VAE) and score them: PSNR, SSIM, LPIPS (AlexNet), optionally FVD.

Inputs are video files, folders of video files, or WebDataset shards (a ``.tar`` or a folder of them). Each clip is
taken from its first frame at ``--fps`` (default: the file's own rate), ``--num-frames`` long (``1 + 4k`` for the
4x temporal VAEs; default: as many as fit, up to ``--max-frames``), resized to cover ``--size`` and centre-cropped
(default: the file's own size, centre-cropped to multiples of the VAE's spatial compression).

    python -m tools.reconstruct clip.mp4 --vae-folder runs/vae/model --out reports/recon --side-by-side
    python -m tools.reconstruct data/real_heldout --kind wan --path weights/wan2.2-vae --num-frames 17 --size 256 \
        --tile-size 256 --fvd --out reports/recon_wan
    python -m tools.reconstruct clip.mp4 --random-tiny --out /tmp/recon     # plumbing check, random weights

Writes ``<out>/<clip>.mp4`` (reconstruction, or original | reconstruction with ``--side-by-side``) and
``<out>/metrics.json``: per-clip and mean PSNR (dB, capped at 100 for identical clips), SSIM and LPIPS, and FVD over
the set's 16-frame windows when ``--fvd`` is given. The metrics are computed on the float reconstructions, before
mp4 compression.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from infra.data.buckets import frame_offsets, frame_span
from infra.data.decode import open_video
from infra.data.shard_index import ShardReader, find_shards, index_shards
from infra.data.skips import SkipCounter
from infra.data.transforms import frames_to_tensor
from infra.metrics.image_quality import psnr, ssim

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mpg", ".mpeg", ".mov", ".mkv", ".webm", ".avi")
METRICS_NAME = "metrics.json"


class TooShortError(ValueError):
    """A clip holds fewer frames than the requested length needs."""


class Clip(NamedTuple):
    """One input clip: (3, T, H, W) in [-1, 1]; ``fps`` is the rate its frames were taken at (for writing)."""

    name: str
    video: torch.Tensor
    fps: Optional[float] = None


# ----------------------------------------------------------------------------------------------- frame geometry
@dataclass(frozen=True)
class FrameGeometry:
    """What a first stage accepts: T = 1 + temporal * k (odd latent frame count when ``odd_latents``), H and W
    multiples of ``spatial``."""

    temporal: int
    spatial: int
    odd_latents: bool = False

    @classmethod
    def of(cls, first_stage: nn.Module) -> "FrameGeometry":
        from vae.first_stage import CogVideoXFirstStage

        # CogVideoX's decoder inverts its encoder only for an odd number of latent frames (see vae.first_stage).
        odd = isinstance(first_stage, CogVideoXFirstStage)
        return cls(int(first_stage.temporal_compression), int(first_stage.spatial_compression), odd)

    def frames_ok(self, t: int) -> bool:
        if t < 1 or (t - 1) % self.temporal:
            return False
        return not self.odd_latents or ((t - 1) // self.temporal) % 2 == 0

    def frames_rule(self) -> str:
        step = self.temporal * (2 if self.odd_latents else 1)
        return f"1 + {step}k (1, {1 + step}, {1 + 2 * step}, ...)"

    def check(self, video: torch.Tensor, name: str = "clip") -> None:
        """Raise ValueError naming what does not fit in a (3, T, H, W) video."""
        if video.dim() != 4 or video.shape[0] != 3:
            raise ValueError(f"{name}: expected a video (3, T, H, W), got shape {tuple(video.shape)}")
        t, h, w = video.shape[1:]
        if not self.frames_ok(t):
            raise ValueError(f"{name}: frame count T must be {self.frames_rule()} for this VAE, got {t}")
        if h % self.spatial or w % self.spatial:
            raise ValueError(f"{name}: height and width must be multiples of {self.spatial}, got {h}x{w}")


@dataclass
class ClipSpec:
    """How to cut clips from input files."""

    num_frames: Optional[int] = None  # None: as many as fit, up to max_frames
    max_frames: int = 49
    fps: Optional[float] = None  # None: the source's own rate (every frame)
    height: Optional[int] = None  # with width: resize to cover, centre crop; None: source size cropped to fit
    width: Optional[int] = None
    decoder: str = "decord"

    def validate(self, geometry: FrameGeometry) -> None:
        if self.num_frames is not None and not geometry.frames_ok(self.num_frames):
            raise ValueError(f"num_frames must be {geometry.frames_rule()} for this VAE, got {self.num_frames}")
        if self.num_frames is None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if (self.height is None) != (self.width is None):
            raise ValueError("give both height and width, or neither")
        for key in ("height", "width"):
            value = getattr(self, key)
            if value is not None and (value <= 0 or value % geometry.spatial):
                raise ValueError(f"{key} must be a positive multiple of the VAE's spatial compression "
                                 f"{geometry.spatial}, got {value}")


def choose_frame_count(available: int, source_fps: float, fps: float, spec: ClipSpec, geometry: FrameGeometry) -> int:
    """The clip length: ``spec.num_frames`` when it fits, else the longest valid length up to ``spec.max_frames``."""
    if spec.num_frames is not None:
        span = frame_span(spec.num_frames, source_fps, fps)
        if span > available:
            raise TooShortError(f"{spec.num_frames} frames at {fps:g} fps need {span} source frames "
                                f"({source_fps:g} fps), the clip has {available}")
        return spec.num_frames
    for t in range(spec.max_frames, 0, -1):
        if geometry.frames_ok(t) and frame_span(t, source_fps, fps) <= available:
            return t
    raise TooShortError(f"the clip has {available} frames, too few for even one")


def centre_crop_to_multiple(frames: np.ndarray, multiple: int) -> np.ndarray:
    """Crop uint8 frames (T, H, W, 3) around the centre to the largest multiples of ``multiple`` (no resize)."""
    h, w = frames.shape[1], frames.shape[2]
    th, tw = h // multiple * multiple, w // multiple * multiple
    if th == 0 or tw == 0:
        raise ValueError(f"frames of {h}x{w} are smaller than the VAE's spatial compression {multiple}")
    top, left = (h - th) // 2, (w - tw) // 2
    return frames[:, top:top + th, left:left + tw]


def clip_from_bytes(data: bytes, name: str, spec: ClipSpec, geometry: FrameGeometry) -> Clip:
    """Decode the frames a clip needs from video bytes and shape them for the VAE."""
    source = open_video(data, spec.decoder)
    try:
        source_fps = source.fps
        if not source_fps > 0:
            raise ValueError(f"{name}: the file gives no frame rate")
        fps = spec.fps or source_fps
        # PyAV may not know the frame count up front: then decode everything once and pick from it.
        everything = source.get_all() if source.num_frames <= 0 else None
        available = source.num_frames if everything is None else len(everything)
        try:
            t = choose_frame_count(available, source_fps, fps, spec, geometry)
        except TooShortError as e:
            raise TooShortError(f"{name}: {e}") from None
        indices = frame_offsets(t, source_fps, fps)
        frames = source.get(indices) if everything is None else everything[indices]
    finally:
        source.close()
    if spec.height is None:
        frames = centre_crop_to_multiple(frames, geometry.spatial)
        height, width = frames.shape[1], frames.shape[2]
    else:
        height, width = spec.height, spec.width
    return Clip(name, frames_to_tensor(np.ascontiguousarray(frames), height, width), fps)


# ------------------------------------------------------------------------------------------------------ inputs
def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "clip"


def iter_video_sources(inputs: Sequence[str | Path]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every video among the inputs: video files, folders of them, shard tars or folders of shards
    (shard folders are read through the shard index, in shard and tar order)."""
    for item in map(Path, inputs):
        if not item.exists():
            raise FileNotFoundError(f"input {item} does not exist")
        if item.is_file() and item.suffix.lower() != ".tar":
            yield _safe_name(item.stem), item.read_bytes()
            continue
        if item.is_dir() and not find_shards([str(item)]):
            files = sorted(p for p in item.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
            if not files:
                raise ValueError(f"folder {item} holds no video files ({', '.join(VIDEO_SUFFIXES)}) and no .tar shards")
            for path in files:
                yield _safe_name(path.stem), path.read_bytes()
            continue
        skips, reader = SkipCounter(), ShardReader()
        try:
            records = index_shards([str(item)], "video", skips)  # a list: commas in paths stay
            if not records:
                raise ValueError(f"{item} holds no usable video samples (skipped: {dict(skips.counts)})")
            for record in records:
                yield _safe_name(record.key), reader.read(record, record.media_ext)
        finally:
            reader.close()


def iter_clips(inputs: Sequence[str | Path], spec: ClipSpec, geometry: FrameGeometry, max_clips: Optional[int] = None,
               skip_short: bool = False) -> Iterator[Clip]:
    """Clips cut from the inputs, one at a time. A clip too short for ``spec`` raises ``TooShortError`` unless
    ``skip_short``, which logs and skips it."""
    spec.validate(geometry)
    count, seen = 0, set()
    for name, data in iter_video_sources(inputs):
        if max_clips is not None and count >= max_clips:
            return
        try:
            clip = clip_from_bytes(data, name, spec, geometry)
        except TooShortError as e:
            if not skip_short:
                raise
            log.warning("skipping %s", e)
            continue
        # Same stem in two inputs: keep both outputs.
        unique, n = clip.name, 1
        while unique in seen:
            n += 1
            unique = f"{clip.name}_{n}"
        seen.add(unique)
        count += 1
        yield clip._replace(name=unique)


# ----------------------------------------------------------------------------------------------- first stages
def tiny_random_ssvae(seed: int = 0, z_channels: int = 8):
    """A tiny SSVAE with random weights and the released 4x16x16 compression: runs anywhere in seconds, for
    plumbing checks of tools and benchmarks (its reconstructions are noise)."""
    from vae.config import DecoderConfig, EncoderConfig, SSVAEConfig
    from vae.model import SSVAE

    torch.manual_seed(seed)
    common = dict(ch=4, ch_mult=(2, 4, 8, 16, 16), num_res_blocks=1, num_mid_blocks=1, z_channels=z_channels)
    return SSVAE(SSVAEConfig(encoder=EncoderConfig(**common), decoder=DecoderConfig(**common))).eval()


def add_first_stage_args(parser: argparse.ArgumentParser) -> None:
    """The options that pick a first stage (shared by the reconstruction, latent-statistics and benchmark CLIs)."""
    group = parser.add_argument_group("first stage")
    group.add_argument("--vae-folder", help="our SSVAE save_pretrained folder (same as --kind ssvae --path FOLDER)")
    group.add_argument("--kind", choices=("ssvae", "wan", "cogvideox"), default="ssvae")
    group.add_argument("--path", help="local folder of the first stage (a diffusers folder for wan / cogvideox)")
    group.add_argument("--random-tiny", action="store_true", help="a tiny random-weight SSVAE (plumbing checks)")
    group.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--chunk-latent-frames", type=int, default=None,
                       help="SSVAE: latent frames per temporal chunk (long clips; exact)")
    group.add_argument("--tile-size", type=int, default=None, help="spatial tiles of this many pixels (large clips)")
    group.add_argument("--tile-overlap", type=int, default=64)


def first_stage_from_args(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """The first stage the options name, and a JSON description of it."""
    from vae.first_stage import FirstStageConfig, SSVAEFirstStage, load_first_stage
    from vae.inference import InferenceConfig

    chosen = sum(bool(x) for x in (args.vae_folder, args.path, args.random_tiny))
    if chosen != 1:
        raise ValueError("name exactly one first stage: --vae-folder, --kind/--path or --random-tiny")
    if args.random_tiny:
        inference = InferenceConfig(args.chunk_latent_frames, args.tile_size, args.tile_overlap)
        stage = SSVAEFirstStage(tiny_random_ssvae(), inference).to(args.device)
        return stage, {"kind": "ssvae", "path": None, "random_tiny": True}
    kind, path = ("ssvae", args.vae_folder) if args.vae_folder else (args.kind, args.path)
    cfg = FirstStageConfig(kind=kind, path=path, dtype=args.dtype, chunk_latent_frames=args.chunk_latent_frames,
                           tile_size=args.tile_size, tile_overlap=args.tile_overlap)
    return load_first_stage(cfg, args.device), {"kind": kind, "path": str(path), "dtype": args.dtype}


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- reconstruction
@torch.no_grad()
def lpips_of_video(net: nn.Module, x: torch.Tensor, y: torch.Tensor, frames_per_batch: int = 8) -> float:
    """Mean LPIPS over the frames of two videos (3, T, H, W), a few frames per backbone pass."""
    x, y = x.transpose(0, 1), y.transpose(0, 1)  # (T, 3, H, W)
    total = 0.0
    for i in range(0, x.shape[0], frames_per_batch):
        total += float(net(x[i:i + frames_per_batch], y[i:i + frames_per_batch]).sum())
    return total / x.shape[0]


@torch.no_grad()
def reconstruct_clips(first_stage: nn.Module, clips: Iterable[Clip | tuple], *, lpips: Optional[nn.Module] = None,
                      out_dir: Optional[str | Path] = None, side_by_side: bool = False, fps: float = 8.0,
                      fvd: bool = False, fvd_cache: Optional[str | Path] = None, progress: bool = True) -> dict:
    """Encode and decode each clip ``(name, video (3, T, H, W) in [-1, 1][, fps])``; score the reconstructions.

    Returns ``{"clips": [{name, frames, height, width, psnr, ssim, lpips[, video]}], "mean": {psnr, ssim, lpips},
    "num_clips"}`` plus ``"fvd"`` (and ``"fvd_windows"``) when ``fvd`` is set: FVD between the 16-frame windows of
    the originals and of the reconstructions (None, with ``"fvd_note"``, when fewer than 2 windows exist).
    With ``out_dir``, each reconstruction (or original | reconstruction) is written as ``<name>.mp4`` at the clip's
    fps (else ``fps``). ``lpips`` defaults to the pretrained AlexNet LPIPS.
    """
    from tqdm import tqdm

    from infra.metrics.lpips import LPIPS
    from infra.video_io import side_by_side as stack_videos
    from infra.video_io import write_video

    device = _device_of(first_stage)
    geometry = FrameGeometry.of(first_stage)
    lpips = (lpips if lpips is not None else LPIPS("alex")).to(device)
    features, real_feats, fake_feats = None, [], []
    if fvd:
        from infra.metrics.fvd import I3DFeatures

        features = I3DFeatures(cache_dir=fvd_cache, device=device)

    rows = []
    for item in tqdm(clips, desc="reconstruct", unit="clip", disable=not progress):
        clip = Clip(*item)
        geometry.check(clip.video, clip.name)
        x = clip.video.to(device, torch.float32)
        recon = first_stage.decode(first_stage.encode(x[None]))[0].float().clamp(-1, 1)
        if recon.shape != x.shape:
            raise RuntimeError(f"{clip.name}: the first stage returned {tuple(recon.shape)} for {tuple(x.shape)}")
        # PSNR and SSIM in float64 on the CPU (their filter windows live there); LPIPS where the model is.
        x_cpu, recon_cpu = x[None].cpu(), recon[None].cpu()
        row = {"name": clip.name, "frames": x.shape[1], "height": x.shape[2], "width": x.shape[3],
               "psnr": float(psnr(x_cpu, recon_cpu)[0]), "ssim": float(ssim(x_cpu, recon_cpu)[0]),
               "lpips": lpips_of_video(lpips, x, recon)}
        if features is not None:
            real_feats.append(features(split_windows(x)))
            fake_feats.append(features(split_windows(recon)))
        if out_dir is not None:
            video = stack_videos(x, recon) if side_by_side else recon
            row["video"] = str(write_video(Path(out_dir) / f"{clip.name}.mp4", video, clip.fps or fps))
        rows.append(row)
    if not rows:
        raise ValueError("no clips to reconstruct")

    result = {"num_clips": len(rows),
              "mean": {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "lpips")},
              "clips": rows}
    if features is not None:
        result.update(fvd_of_features(real_feats, fake_feats))
    return result


def split_windows(video: torch.Tensor) -> list[torch.Tensor]:
    from infra.metrics.fvd import split_clips

    return split_clips(video.cpu())


def fvd_of_features(real: list[np.ndarray], fake: list[np.ndarray]) -> dict:
    from infra.metrics.fvd import CLIP_FRAMES, frechet_distance

    real_all, fake_all = np.concatenate(real), np.concatenate(fake)
    if len(real_all) < 2:
        return {"fvd": None, "fvd_windows": len(real_all),
                "fvd_note": f"FVD needs >= 2 windows of {CLIP_FRAMES} frames, the clips give {len(real_all)}"}
    return {"fvd": frechet_distance(real_all, fake_all), "fvd_windows": len(real_all)}


def format_summary(result: dict) -> str:
    mean = result["mean"]
    text = (f"{result['num_clips']} clips: PSNR {mean['psnr']:.2f} dB, SSIM {mean['ssim']:.4f}, "
            f"LPIPS {mean['lpips']:.4f}")
    if result.get("fvd") is not None:
        text += f", FVD {result['fvd']:.1f} ({result['fvd_windows']} windows)"
    return text


def add_clip_args(parser: argparse.ArgumentParser, num_frames: Optional[int] = None,
                  size: Optional[int] = None, fps: Optional[float] = None) -> None:
    """The options that cut clips (shared with the benchmark, which sets small defaults)."""
    group = parser.add_argument_group("clips")
    group.add_argument("--num-frames", type=int, default=num_frames,
                       help="frames per clip, 1 + 4k (default: as many as fit, up to --max-frames)")
    group.add_argument("--max-frames", type=int, default=49)
    group.add_argument("--fps", type=float, default=fps, help="frame rate to sample at (default: the file's)")
    group.add_argument("--size", type=int, default=size, help="square size: resize to cover, centre crop")
    group.add_argument("--height", type=int, default=None)
    group.add_argument("--width", type=int, default=None)
    group.add_argument("--decoder", choices=("decord", "pyav"), default="decord")


def clip_spec_from_args(args: argparse.Namespace) -> ClipSpec:
    height = args.height if args.height is not None else args.size
    width = args.width if args.width is not None else args.size
    return ClipSpec(args.num_frames, args.max_frames, args.fps, height, width, args.decoder)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description="Reconstruct videos through a VAE; PSNR, SSIM, LPIPS (and FVD).")
    parser.add_argument("inputs", nargs="+", help="video files, folders of them, shard .tar files or shard folders")
    parser.add_argument("--out", required=True, help="folder for the reconstructions and metrics.json")
    parser.add_argument("--max-clips", type=int, default=None)
    parser.add_argument("--skip-short", action="store_true", help="skip clips too short instead of failing")
    parser.add_argument("--side-by-side", action="store_true", help="write original | reconstruction")
    parser.add_argument("--no-videos", action="store_true", help="write only metrics.json")
    parser.add_argument("--fvd", action="store_true", help="also FVD over the set (needs the pinned I3D asset)")
    parser.add_argument("--fvd-cache", default=None, help="folder caching per-window I3D features")
    add_clip_args(parser)
    add_first_stage_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    fvd_note = None
    if args.fvd:
        from infra.assets import AssetError, asset_path

        try:  # find out before reconstructing
            asset_path("i3d/kinetics-400")
        except AssetError as e:
            fvd_note = f"FVD skipped: {e}"
            log.warning(fvd_note)
    first_stage, description = first_stage_from_args(args)
    geometry = FrameGeometry.of(first_stage)
    spec = clip_spec_from_args(args)
    spec.validate(geometry)
    out = Path(args.out)
    clips = iter_clips(args.inputs, spec, geometry, args.max_clips, args.skip_short)
    result = reconstruct_clips(first_stage, clips, out_dir=None if args.no_videos else out,
                               side_by_side=args.side_by_side, fvd=args.fvd and fvd_note is None,
                               fvd_cache=args.fvd_cache)
    if fvd_note is not None:
        result.update(fvd=None, fvd_note=fvd_note)
    result = {"first_stage": description, "clip_spec": asdict(spec), **result}
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_NAME).write_text(json.dumps(result, indent=2) + "\n")
    print(format_summary(result))
    return result


if __name__ == "__main__":
    main()
