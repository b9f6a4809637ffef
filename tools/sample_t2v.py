"""Text-to-video sampling: prompts -> mp4 files through the frozen first stage's decoder.

    python -m tools.sample_t2v --run runs/t2v_tiny --out samples/ --prompt "a red square" [key=value ...]
    python -m tools.sample_t2v --config configs/t2v/cogvideox_2b_ssvae.yaml --dit runs/x/dit --out samples/

``--run`` takes a training's output folder: its ``config.yaml`` and its exported ``dit`` folder (a diffusers
``CogVideoXTransformer3DModel`` folder). Sizes, steps, guidance, sampler and seed come from the config's
``sampling:`` section (override with ``sampling.steps=20`` etc.). Prompt ``i`` is sampled from noise seeded by
``sampling.seed + i``, so a prompt gives the same video alone, in a list, or on any rank; the training's periodic
sampling calls the same ``dit.runtime.sample_prompts`` and therefore matches this tool.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> list[Path]:
    from dit.convert import from_diffusers
    from dit.runtime import (add_run_arguments, build_first_stage, build_frozen_text_encoder, encode_text,
                             run_from_arguments, sample_prompts, uses_text_mask)

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the mp4 files")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); default: sampling.prompts")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    cfg, dit_folder = run_from_arguments(parser, args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
    model = from_diffusers(dit_folder).to(device, dtype).eval()
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
