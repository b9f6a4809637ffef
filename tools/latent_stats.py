"""Per-channel statistics of latents (N, C, T, H, W), in one pass or accumulated over a data set; and the CLI that
measures a VAE's latent normalisation and stores it with the model.

The SSVAE inference normalisation needs each channel's mean and std over a data set (``encode`` returns
``(mean - m) / s``); the same numbers tell how Gaussian a latent space looks (excess kurtosis 0 for a Gaussian).

The CLI encodes the first ``--num-clips`` clips of the inputs (shard folders or tars, video files or folders: the
inputs of ``tools.reconstruct``) to their raw posterior means (the first stage's normalisation undone), accumulates
the moments, prints a summary (overall std, mean |channel mean|) and writes the JSON (``mean`` and ``std`` per
channel at the top level, as ``vae.official.read_latent_stats`` reads). ``--store`` puts them into our SSVAE's
save_pretrained folder (``set_latent_stats`` + ``save_pretrained``, and ``latent_stats.json`` beside the weights):

    python -m tools.latent_stats data/default data/real_train --vae-folder runs/vae_tiny/model --num-clips 256 \
        --num-frames 17 --size 256 --store
    python -m tools.latent_stats data/default --kind wan --path weights/wan2.2-vae --json reports/wan_stats.json
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from torch import nn

STATS_NAME = "latent_stats.json"
MIN_STD = 1e-6  # floor for dead channels: set_latent_stats needs std > 0


class LatentMoments:
    """Running per-channel sums of x, x^2, x^3, x^4 (float64), min and max, over batches of latents."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: torch.Tensor | None = None  # (4, C)
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def update(self, latents: torch.Tensor) -> "LatentMoments":
        if latents.dim() != 5:
            raise ValueError(f"latents must be (N, C, T, H, W), got shape {tuple(latents.shape)}")
        x = latents.detach().to(torch.float64).transpose(0, 1).reshape(latents.shape[1], -1)  # (C, M)
        if self.sums is not None and x.shape[0] != self.sums.shape[1]:
            raise ValueError(f"latents have {x.shape[0]} channels, earlier batches had {self.sums.shape[1]}")
        sums = torch.stack([x.sum(1), (x**2).sum(1), (x**3).sum(1), (x**4).sum(1)])
        low, high = x.min(1).values, x.max(1).values
        if self.sums is None:
            self.sums, self.low, self.high = sums, low, high
        else:
            self.sums += sums
            self.low, self.high = torch.minimum(self.low, low), torch.maximum(self.high, high)
        self.count += x.shape[1]
        return self

    def result(self) -> dict:
        """Per channel: ``mean``, ``std`` (population), ``kurtosis`` (excess), ``min``, ``max``; plus overall values."""
        if self.sums is None:
            raise ValueError("no latents were added")
        n = self.count
        m1, m2, m3, m4 = (s / n for s in self.sums)
        var = (m2 - m1**2).clamp_min(0.0)
        # Central fourth moment from raw moments.
        c4 = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4
        kurtosis = c4 / var.clamp_min(1e-24) ** 2 - 3.0
        overall_mean = m1.mean()
        overall_var = (m2.mean() - overall_mean**2).clamp_min(0.0)
        return {
            "channels": int(m1.numel()),
            "count": n,
            "mean": m1.tolist(),
            "std": var.sqrt().tolist(),
            "kurtosis": kurtosis.tolist(),
            "min": self.low.tolist(),
            "max": self.high.tolist(),
            "overall_mean": float(overall_mean),
            "overall_std": float(overall_var.sqrt()),
            "mean_abs_channel_mean": float(m1.abs().mean()),
            "mean_kurtosis": float(kurtosis.mean()),
        }


def latent_statistics(latents: torch.Tensor) -> dict:
    """Per-channel and overall statistics of one tensor of latents (N, C, T, H, W); see ``LatentMoments.result``."""
    return LatentMoments().update(latents).result()


# ------------------------------------------------------------------------------------------ measuring a VAE
@torch.no_grad()
def raw_latents(first_stage: nn.Module, video: torch.Tensor) -> torch.Tensor:
    """Un-normalised posterior mean of ``video`` (B, 3, T, H, W): the first stage's encode with its normalisation
    undone (our SSVAE: z * s + m; Wan: per-channel config stats; CogVideoX: scaling and shift factors)."""
    from vae.first_stage import SSVAEFirstStage

    if getattr(first_stage, "sample", False):
        raise ValueError("latent statistics are of the posterior mean: load the first stage with sample=False")
    z = first_stage.encode(video).float()
    if isinstance(first_stage, SSVAEFirstStage):
        return first_stage.vae.denormalize_latent(z)
    return first_stage.denormalize(z)


def measure_latent_stats(first_stage: nn.Module, clips: Iterable, progress: bool = True) -> dict:
    """``LatentMoments.result()`` of the raw latents of clips ``(name, video (3, T, H, W)[, fps])``, one at a time."""
    from tqdm import tqdm

    param = next(first_stage.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    moments, count = LatentMoments(), 0
    for clip in tqdm(clips, desc="latent stats", unit="clip", disable=not progress):
        moments.update(raw_latents(first_stage, clip[1][None].to(device)).cpu())
        count += 1
    if count == 0:
        raise ValueError("no clips to measure")
    return {"num_clips": count, **moments.result()}


def save_with_stats(model: nn.Module, stats: dict, folder: str | Path) -> Path:
    """Set ``stats`` mean/std as an SSVAE's latent normalisation and save it (save_pretrained + the JSON)."""
    model.set_latent_stats(stats["mean"], [max(s, MIN_STD) for s in stats["std"]])
    folder = Path(folder)
    model.save_pretrained(folder)
    (folder / STATS_NAME).write_text(json.dumps(stats, indent=1) + "\n")
    return folder


def store_in_ssvae_folder(folder: str | Path, stats: dict, save_to: Optional[str | Path] = None) -> Path:
    """Write ``stats`` into an SSVAE save_pretrained folder (or into a copy of the model in ``save_to``)."""
    from vae.model import SSVAE

    # Reloaded in its stored dtype, so the weights are rewritten unchanged whatever dtype the measurement used.
    return save_with_stats(SSVAE.from_pretrained(folder), stats, save_to or folder)


def store_in_diffusers_folder(kind: str, folder: str | Path, stats: dict, save_to: str | Path) -> Path:
    """A trained ``wan`` / ``cogvideox`` VAE's folder copied to ``save_to`` with ``stats`` as the normalisation its
    first stage applies: Wan's per-channel ``latents_mean`` / ``latents_std``; CogVideoX's scalar ``shift_factor``
    (the mean over channels) and ``scaling_factor`` (one over the pooled std), since its pipelines scale by one
    number."""
    from vae.diffusers_vaes import DiffusersVAE

    model = DiffusersVAE.from_pretrained(kind, folder).model
    mean, std = list(map(float, stats["mean"])), [max(float(s), MIN_STD) for s in stats["std"]]
    if kind == "wan":
        model.register_to_config(latents_mean=mean, latents_std=std)
    else:
        shift = sum(mean) / len(mean)
        pooled = (sum(s * s + (m - shift) ** 2 for m, s in zip(mean, std)) / len(std)) ** 0.5
        model.register_to_config(shift_factor=shift, scaling_factor=1.0 / max(pooled, MIN_STD))
    folder = Path(save_to)
    model.save_pretrained(str(folder))
    (folder / STATS_NAME).write_text(json.dumps(stats, indent=1) + "\n")
    return folder


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from tools.reconstruct import (FrameGeometry, add_clip_args, add_first_stage_args, clip_spec_from_args,
                                   first_stage_from_args, iter_clips)

    parser = argparse.ArgumentParser(description="Per-channel mean and std of a VAE's latents over a data set.")
    parser.add_argument("inputs", nargs="+", help="shard folders or .tar files, video files or folders of them")
    parser.add_argument("--num-clips", type=int, default=64, help="the first N usable clips of the inputs")
    parser.add_argument("--json", default=None, help="write the statistics here")
    parser.add_argument("--store", action="store_true",
                        help="SSVAE only: set the stats in the model folder (set_latent_stats + save_pretrained)")
    parser.add_argument("--save-to", default=None, help="with --store: save the model with its stats here instead")
    add_clip_args(parser, num_frames=17, size=256, fps=8.0)
    add_first_stage_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.num_clips < 1:
        parser.error("--num-clips must be >= 1")
    ssvae_folder = args.vae_folder or (args.path if args.kind == "ssvae" else None)
    if args.store and not (ssvae_folder or args.save_to):
        parser.error("--store needs our SSVAE (--vae-folder, or --kind ssvae --path), or --save-to")
    if args.save_to and not args.store:
        parser.error("--save-to goes with --store")

    first_stage, description = first_stage_from_args(args)
    spec = clip_spec_from_args(args)
    clips = iter_clips(args.inputs, spec, FrameGeometry.of(first_stage), args.num_clips, skip_short=True)
    stats = {"first_stage": description, "clip_spec": asdict(spec), **measure_latent_stats(first_stage, clips)}
    if stats["num_clips"] < args.num_clips:
        logging.getLogger(__name__).warning("asked for %d clips, the inputs gave %d", args.num_clips,
                                            stats["num_clips"])
    if args.store:
        if ssvae_folder:
            target = store_in_ssvae_folder(ssvae_folder, stats, args.save_to)
        else:  # the in-memory tiny random model
            target = save_with_stats(first_stage.vae, stats, args.save_to)
        print(f"stored the latent stats in {target}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps({k: stats[k] for k in ("num_clips", "channels", "overall_mean", "overall_std",
                                            "mean_abs_channel_mean", "mean", "std")}))
    return stats


if __name__ == "__main__":
    main()
