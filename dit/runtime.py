"""The DiT's run-time pieces that training, sampling and latent caching share: the frozen first stage and text
encoder, text encoding, the DiT built for them, and sampling prompts to mp4.

Library code: ``dit.train``, ``dit.latent_cache`` and the command-line tools (``tools/sample_t2v``,
``tools/cache_latents``) import from here, and nothing here imports an entry point or a tool.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from infra.video_io import write_video
from vae.first_stage import FirstStage, load_first_stage

from .text_encoder import build_text_encoder
from .train_config import T2VTrainConfig
from .transformer import CogVideoXTransformer, adaln_zero_init

EXPORT_DIR = "dit"  # <output_dir>/dit: the final weights as a diffusers folder


def add_run_arguments(parser) -> None:
    """The command-line options naming a trained run: ``--run`` (its output folder), or ``--config`` and ``--dit``
    (one overriding the run's), plus ``key=value`` overrides; read them back with ``run_from_arguments``."""
    parser.add_argument("--run", help="a training's output folder (its config.yaml and dit/)")
    parser.add_argument("--config", help="run YAML (default: <run>/config.yaml)")
    parser.add_argument("--dit", help="diffusers transformer folder (default: <run>/dit)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run config, e.g. sampling.steps=20")


def run_from_arguments(parser, args) -> tuple[T2VTrainConfig, Path]:
    """The run's validated config and its DiT folder, from ``add_run_arguments``' options."""
    from infra.config import load_config

    if not args.run and not (args.config and args.dit):
        parser.error("give --run, or both --config and --dit")
    cfg = load_config(T2VTrainConfig, args.config or Path(args.run) / "config.yaml", args.overrides)
    return cfg, Path(args.dit or Path(args.run) / EXPORT_DIR)


def build_first_stage(cfg: T2VTrainConfig, device: torch.device) -> FirstStage:
    return load_first_stage(cfg.first_stage, device=device).eval().requires_grad_(False)


def build_frozen_text_encoder(cfg: T2VTrainConfig, device: torch.device):
    encoder = build_text_encoder(cfg.text_encoder)
    if isinstance(encoder, torch.nn.Module):
        encoder = encoder.to(device).eval().requires_grad_(False)
    return encoder


def build_dit(cfg: T2VTrainConfig, first_stage: FirstStage, text_embed_dim: int) -> CogVideoXTransformer:
    """The DiT whose channels, patch size and text width follow from the first stage and the text encoder."""
    config = cfg.model.build(first_stage.latent_channels, first_stage.spatial_compression, text_embed_dim,
                             cfg.text_encoder.max_length)
    model = CogVideoXTransformer(config)
    if cfg.model.init == "adaln_zero":
        adaln_zero_init(model)
    return model


@torch.no_grad()
def encode_text(text_encoder, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    states, mask = text_encoder.encode(list(captions))
    return states.to(device).float(), mask.to(device).bool()


def uses_text_mask(cfg: T2VTrainConfig, text_encoder) -> bool:
    """Whether the DiT attends only to real text tokens: ``diffusion.text_mask``, else as the encoder masks."""
    if cfg.diffusion.text_mask is not None:
        return cfg.diffusion.text_mask
    return bool(getattr(text_encoder, "mask_padding", True))


@torch.no_grad()
def sample_videos(model, first_stage, text_states: torch.Tensor, text_mask: torch.Tensor | None, cfg,
                  indices: Sequence[int] | None = None, batch_size: int = 16) -> torch.Tensor:
    """One video per row of ``text_states`` (B, L, D): (B, 3, T, H, W) float in [-1, 1]. ``text_mask`` (B, L) when
    the DiT masks text padding (see ``uses_text_mask``), else None.

    ``cfg`` is a ``T2VTrainConfig`` (its ``sampling``, ``diffusion`` and ``data`` sections); ``indices`` are the rows'
    positions in the prompt list (their seeds), 0..B-1 when not given. Prompt ``i`` starts from noise drawn from its
    own generator (``sampling.seed + i``); the deterministic DDIM sampler then runs up to ``batch_size`` prompts
    through the DiT and the decoder together (a prompt's video is the same alone or in a batch, up to float
    rounding); the stochastic DPM++ sampler draws from that generator at every step, one prompt at a time.
    ``dit.pipeline_ssvae_cogvideox`` (the exported diffusers pipeline) repeats exactly this.
    """
    from dit.samplers import sample

    s = cfg.sampling
    indices = list(range(text_states.shape[0])) if indices is None else list(indices)
    if len(indices) != text_states.shape[0]:
        raise ValueError(f"{len(indices)} indices for {text_states.shape[0]} prompts")
    frames, height, width = cfg.sample_shape()
    channels, latent_frames, h, w = first_stage.latent_shape(frames, height, width)
    device = text_states.device
    dtype = next(model.parameters()).dtype
    per_call = batch_size if s.sampler == "ddim" else 1
    videos = []
    for start in range(0, len(indices), per_call):
        rows = list(range(start, min(start + per_call, len(indices))))
        generators = [torch.Generator(device=device).manual_seed(s.seed + indices[r]) for r in rows]
        noise = torch.cat([torch.randn((1, latent_frames, channels, h, w), generator=g, device=device)
                           for g in generators])
        latents = sample(model, text_states[rows].to(dtype), latents=noise, steps=s.steps, guidance=s.guidance,
                         dynamic_cfg=s.dynamic_cfg, sampler=s.sampler, generator=generators[0],
                         diffusion=cfg.diffusion.schedule, text_mask=None if text_mask is None else text_mask[rows])
        videos.append(first_stage.decode(latents.permute(0, 2, 1, 3, 4)))  # DiT (B, F, C, h, w) -> VAE (B, C, F, h, w)
    return torch.cat(videos)


@torch.no_grad()
def sample_prompts(model, first_stage, text_states: torch.Tensor, text_mask: torch.Tensor | None, cfg,
                   out_dir: str | Path, indices: Sequence[int] | None = None, batch_size: int = 16) -> list[Path]:
    """``sample_videos``, written to ``<out_dir>/prompt_<i>.mp4`` (``i`` from ``indices``) at the run's sample fps."""
    indices = list(range(text_states.shape[0])) if indices is None else list(indices)
    paths = []
    for start in range(0, len(indices), batch_size):
        part = slice(start, start + batch_size)
        mask = None if text_mask is None else text_mask[part]
        videos = sample_videos(model, first_stage, text_states[part], mask, cfg, indices[part], batch_size)
        for index, video in zip(indices[part], videos):
            paths.append(write_video(Path(out_dir) / f"prompt_{index:02d}.mp4", video, cfg.sample_fps()))
    return paths
