"""Text-to-video sampling: prompts -> mp4 files through the frozen first stage's decoder.

    python -m tools.sample_t2v --run runs/t2v_tiny --out samples/ --prompt "a red square" [key=value ...]
    python -m tools.sample_t2v --config configs/t2v/cogvideox_2b_ssvae.yaml --dit runs/x/dit --out samples/

``--run`` takes a training's output folder: its ``config.yaml`` and its exported ``dit`` folder (a diffusers
``CogVideoXTransformer3DModel`` folder). Sizes, steps, guidance, sampler and seed come from the config's
``sampling:`` section (override with ``sampling.steps=20`` etc.). Prompt ``i`` is sampled from noise seeded by
``sampling.seed + i``, so a prompt gives the same video alone, in a list, or on any rank; the training's periodic
sampling calls ``sample_prompts`` and therefore matches this tool.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from infra.config import load_config
from infra.video_io import write_video


@torch.no_grad()
def sample_prompts(model, first_stage, text_states: torch.Tensor, text_mask: torch.Tensor | None, cfg,
                   out_dir: str | Path, indices: Sequence[int] | None = None, batch_size: int = 16) -> list[Path]:
    """Sample one video per row of ``text_states`` (B, L, D) and write ``<out_dir>/prompt_<i>.mp4``; ``text_mask``
    (B, L) when the DiT masks text padding (see ``dit.train.uses_text_mask``), else None.

    ``cfg`` is a ``T2VTrainConfig`` (its ``sampling``, ``diffusion`` and ``data`` sections); ``indices`` are the rows'
    positions in the prompt list (their seeds and file names), 0..B-1 when not given. Prompt ``i`` starts from noise
    drawn from its own generator (``sampling.seed + i``); the deterministic DDIM sampler then runs up to
    ``batch_size`` prompts through the DiT and the decoder together (a prompt's video is the same alone or in a batch,
    up to float rounding); the stochastic DPM++ sampler draws from that generator at every step, one prompt at a time.
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
    paths = []
    for start in range(0, len(indices), per_call):
        rows = list(range(start, min(start + per_call, len(indices))))
        generators = [torch.Generator(device=device).manual_seed(s.seed + indices[r]) for r in rows]
        noise = torch.cat([torch.randn((1, latent_frames, channels, h, w), generator=g, device=device)
                           for g in generators])
        latents = sample(model, text_states[rows].to(dtype), latents=noise, steps=s.steps, guidance=s.guidance,
                         dynamic_cfg=s.dynamic_cfg, sampler=s.sampler, generator=generators[0],
                         diffusion=cfg.diffusion.schedule, text_mask=None if text_mask is None else text_mask[rows])
        videos = first_stage.decode(latents.permute(0, 2, 1, 3, 4))  # DiT (B, F, C, h, w) -> VAE (B, C, F, h, w)
        for row, video in zip(rows, videos):
            paths.append(write_video(Path(out_dir) / f"prompt_{indices[row]:02d}.mp4", video, cfg.sample_fps()))
    return paths


def main(argv: list[str] | None = None) -> list[Path]:
    from dit.convert import from_diffusers
    from dit.train import EXPORT_DIR, build_first_stage, build_frozen_text_encoder, encode_text, uses_text_mask
    from dit.train_config import T2VTrainConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="a training's output folder (its config.yaml and dit/)")
    parser.add_argument("--config", help="run YAML (default: <run>/config.yaml)")
    parser.add_argument("--dit", help="diffusers transformer folder (default: <run>/dit)")
    parser.add_argument("--out", required=True, help="folder for the mp4 files")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); default: sampling.prompts")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sampling.steps=20")
    args = parser.parse_args(argv)
    if not args.run and not (args.config and args.dit):
        parser.error("give --run, or both --config and --dit")
    cfg = load_config(T2VTrainConfig, args.config or Path(args.run) / "config.yaml", args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
    model = from_diffusers(args.dit or Path(args.run) / EXPORT_DIR).to(device, dtype).eval()
    first_stage = build_first_stage(cfg, device)
    text_encoder = build_frozen_text_encoder(cfg, device)
    states, mask = encode_text(text_encoder, args.prompt or cfg.sampling.prompts, device)
    paths = sample_prompts(model, first_stage, states, mask if uses_text_mask(cfg, text_encoder) else None, cfg,
                           args.out)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
