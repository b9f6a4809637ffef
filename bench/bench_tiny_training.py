"""Training-step time of the CPU-scale models the main job and the tiny study train: the tiny SSVAE and the tiny DiT.

Each step is what the trainings do per micro-batch, without the engine: the SSVAE's generator step (posterior
sample, LMR, decoder, L1 + KL + LCR with its adaptive weight) on a batch of ``configs/vae/tiny.yaml`` (4 clips of 9
frames, 32x32 crops), and the DiT's v-prediction step on a batch of ``configs/t2v/tiny.yaml`` (32 clips of 4x4x4-
compressed latents, 24 text tokens), each with Adam. The anchor, run side by side, is the tiny SSVAE this project
used before (the released design at 16x compression, ch 8, 64x64 frames, 2 video clips + LPIPS-free loss) on one
batch of its own: the speed-up is per step and per pixel trained on.

    python -m bench.bench_tiny_training            # prints one JSON object

Seen on the 2-core CPU (2026-12-07, 2 threads, median of 5 steps): tiny SSVAE 0.22 s/step, tiny DiT 0.17 s/step
(188 clips/s), the old tiny SSVAE 1.02 s per step of 2 clips at 64x64 (2026-12-03: 0.39, 0.22 and 1.7 s).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_step(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def vae_step_time(cfg, batch: int, frames: int, height: int, width: int, steps: int, warmup: int) -> dict:
    from vae.losses import SSVAELoss
    from vae.model import SSVAE

    torch.manual_seed(0)
    model = SSVAE(cfg.model.design)
    loss_cfg = cfg.loss
    loss_cfg.perceptual_weight, loss_cfg.disc_weight = 0.0, 0.0
    loss = SSVAELoss(loss_cfg)
    optimizer = torch.optim.Adam([*model.parameters(), *loss.autoencoder_parameters()], lr=1e-4)
    x = torch.rand(batch, 3, frames, height, width) * 2 - 1
    if loss_cfg.lmr.enabled and height not in loss_cfg.lmr.mask_probs:
        loss_cfg.lmr.mask_probs[height] = loss_cfg.lmr.mask_probs[next(iter(loss_cfg.lmr.mask_probs))]
        loss_cfg.lmr.block_sizes[height] = [1, 1, 1]

    def step():
        posterior = model.posterior(x)
        z, ratio = loss.apply_lmr(posterior.sample(), model.mask_token, resolution=height)
        total, _ = loss.generator_loss(x, model.decoder(z), posterior, 0,
                                       model.encoder_last_layer if loss_cfg.lcr.enabled else None,
                                       model.decoder_last_layer, lmr_ratio=ratio)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    seconds = _median_step(step, steps, warmup)
    return {"s_per_step": seconds, "clips_per_s": batch / seconds, "pixels_per_s": batch * frames * height * width
            / seconds, "batch": [batch, 3, frames, height, width],
            "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "spatial_compression": model.spatial_compression}


def dit_step_time(cfg, steps: int, warmup: int) -> dict:
    from dit.diffusion import VPrediction
    from dit.transformer import CogVideoXTransformer

    torch.manual_seed(0)
    channels, compression = 48, 4  # the tiny SSVAE's latents
    config = cfg.model.build(channels, compression, 384, cfg.text_encoder.max_length)
    model = CogVideoXTransformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    b, d = cfg.data.video_batch_size, cfg.data
    latents = torch.randn(b, 1 + (d.num_frames - 1) // 4, channels, d.height // compression, d.width // compression)
    text = torch.randn(b, cfg.text_encoder.max_length, 384)
    mask = torch.ones(b, cfg.text_encoder.max_length, dtype=torch.bool)
    mask[:, 16:] = False
    process = VPrediction(cfg.diffusion.schedule)
    generator = torch.Generator().manual_seed(0)

    def step():
        loss = process.training_loss(model, latents, text, mask, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = _median_step(step, steps, warmup)
    return {"s_per_step": seconds, "clips_per_s": b / seconds, "batch": list(latents.shape),
            "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6, "patch_size": config.patch_size,
            "video_tokens": latents.shape[1] * (latents.shape[3] // config.patch_size) ** 2}


def main(argv=None) -> dict:
    from dit.train_config import T2VTrainConfig
    from infra.config import load_config
    from vae.config import DecoderConfig, EncoderConfig
    from vae.train_config import VAEModelConfig, VAETrainConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    vae_cfg = load_config(VAETrainConfig, ROOT / "configs/vae/tiny.yaml")
    d = vae_cfg.data
    out = {"threads": args.threads,
           "tiny_vae": vae_step_time(vae_cfg, d.video_batch_size, d.num_frames, d.height, d.width, args.steps,
                                     args.warmup)}
    old = load_config(VAETrainConfig, ROOT / "configs/vae/tiny.yaml")
    common = dict(ch=8, ch_mult=(2, 4, 4, 8, 8), num_res_blocks=1, num_mid_blocks=1, z_channels=48)
    old.model = VAEModelConfig(encoder=EncoderConfig(**common), decoder=DecoderConfig(**common))
    old.loss.lmr.mask_probs, old.loss.lmr.block_sizes = {64: [0.7, 0.1, 0.1, 0.1]}, {64: [1, 1, 1]}
    out["anchor_old_tiny_vae"] = vae_step_time(old, 2, 9, 64, 64, args.steps, args.warmup)
    out["tiny_vae_pixels_per_s_vs_anchor"] = out["tiny_vae"]["pixels_per_s"] / out["anchor_old_tiny_vae"]["pixels_per_s"]
    out["tiny_dit"] = dit_step_time(load_config(T2VTrainConfig, ROOT / "configs/t2v/tiny.yaml"), args.steps,
                                    args.warmup)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
