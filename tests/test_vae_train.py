"""SSVAE training end to end on the shared engine: the deepspeed launcher, ZeRO-2, held-out real clips, exact resume."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.distributed import free_port
from run_helpers import start_from_checkpoint_of, steps_after

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}

# Whole 32x32 clips of 9 frames (the tiny config's 4x VAE: a 3x8x8 latent, enough for LCR's 2x2x2 windows and LMR's
# blocks), from PyTorch's default initialisation so that learning from scratch is what is tested, with the PatchGAN.
TINY = ["data.num_frames=9", "data.height=32", "data.width=32", "data.resize=0", "data.video_batch_size=2",
        "data.image_batch_size=4", "data.crop=center", "run.progress_bar=false", "run.log_every=1",
        "deepspeed.zero_stage=2", "loss.disc_weight=1.0",
        *[f"model.{part}.{key}" for part in ("encoder", "decoder")
          for key in ("boundary_shortcuts=false", "init=default")], "model.encoder.logvar_init=0.0",
        "loss.lmr.mask_probs={32: [0.7, 0.1, 0.1, 0.1]}", "loss.lmr.block_sizes={32: [1, 1, 1]}",
        "loss.discriminator.max_spatial_down=4", "loss.discriminator.ndf=8", "optimizer.lr=2e-3", "optimizer.warmup_steps=2", "optimizer.decay_steps=0",
        "disc_optimizer.warmup_steps=0", "disc_optimizer.decay_steps=0", "eval.num_clips=2"]


@pytest.fixture(scope="module")
def default_data(generated_clips) -> Path:
    return generated_clips(48)


@pytest.fixture(scope="module")
def real_split(shared_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The real shard split by clip: the first two clips held out (what load_eval_clips takes), the rest to train."""
    import tarfile

    from infra.data.shard_writer import ShardWriter

    src = shared_dir / "data/ssvae_example/video-000000.tar"
    meta = {m["key"]: m for m in map(json.loads, src.with_suffix(".meta.jsonl").read_text().splitlines())}
    out = tmp_path_factory.mktemp("real_train")
    with tarfile.open(src) as tar:
        keys = list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))
        with ShardWriter(out, prefix="video-") as writer:
            for key in keys[2:]:
                writer.write(key, {"mp4": tar.extractfile(f"{key}.mp4").read()},
                             {k: v for k, v in meta[key].items() if k != "key"})
    return out, src


def _train(out: Path, data: Path, heldout: str, *overrides: str, launcher: str = "python", images: str = ""):
    args = ["--config", str(ROOT / "configs/vae/tiny.yaml"), f"run.output_dir={out}", f"data.video_roots={data}",
            f"data.image_roots={images or data}", f"eval.video_roots={heldout}", *TINY, *overrides]
    if launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
               "--module", "vae.train", *args]
    else:
        cmd = [sys.executable, "-m", "vae.train", *args]
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_vae_trains_with_deepspeed_launcher_and_heldout_real_loss_falls(tmp_path, default_data, real_split,
                                                                            shared_dir):
    # Train on real clips, real photos and generated clips; evaluate (EMA weights) on two real clips never trained on.
    # A model this small mostly learns colour and layout in 60 steps, so its output follows the domain of the last
    # batches; the EMA smooths that, and real training video keeps the domains close.
    train_videos, heldout = real_split
    images = str(shared_dir / "data/ssvae_example/image-000000.tar")
    rows = _train(tmp_path / "run", f"{train_videos},{default_data}", str(heldout), "run.max_steps=60",
                  "run.eval_every=60", "run.eval_at_start=true", "run.ema_decay=0.95", "loss.disc_start=1000",
                  "data.image_prob=0.3", "data.video_batch_size=4", "data.image_batch_size=8", "data.crop=random",
                  "optimizer.lr=5e-4", "optimizer.warmup_steps=10", "optimizer.decay_steps=50",
                  "optimizer.min_lr=5e-5", launcher="deepspeed", images=images)
    evals = [r for r in rows if "eval/rec_l1" in r]
    assert [r["step"] for r in evals] == [0, 60]
    assert evals[-1]["eval/rec_l1"] < 0.9 * evals[0]["eval/rec_l1"], evals
    assert evals[-1]["eval/psnr"] > evals[0]["eval/psnr"] + 0.5, evals
    train = [r for r in rows if "loss/l1" in r]
    logged = set().union(*train)  # image steps log no video_corr: look across steps
    assert all(k in logged for k in ("lcr/image_corr", "lcr/video_corr", "scalars/lcr_adaptive_weight",
                                       "loss/kl_per_element", "loss/perceptual", "lmr/mask_ratio"))
    assert (tmp_path / "run/model/config.json").is_file()
    assert (tmp_path / "run/model_raw/config.json").is_file()  # with an EMA, model/ holds the EMA weights
    from vae.model import SSVAE

    SSVAE.from_pretrained(tmp_path / "run/model")  # the export loads as it is: no training-only keys in its config
    assert list((tmp_path / "run/reconstructions/step_000060").glob("*.mp4"))


def test_vae_resume_is_exact(tmp_path, default_data):
    common = ["run.max_steps=6", "run.save_every=2", "run.eval_every=0", "loss.disc_start=3", "eval.write_videos=false"]
    whole = _train(tmp_path / "whole", default_data, str(default_data), *common)
    start_from_checkpoint_of(tmp_path / "whole", tmp_path / "parts", 4)
    parts = _train(tmp_path / "parts", default_data, str(default_data), *common)

    def losses(rows):
        return {r["step"]: (r.get("loss/total"), r.get("loss/disc")) for r in rows if "eval/rec_l1" not in r}

    assert losses(parts) == steps_after(losses(whole), 4) and sorted(losses(parts)) == [5, 6]
    assert any(disc is not None for _, disc in losses(whole).values())  # alternation crossed the resume point
    assert len({v for v in losses(whole).values()}) == 6



def test_bf16_weights_train_on_fp32_clips_without_an_outer_autocast():
    # DeepSpeed's bf16 mode casts the engines' parameters (not buffers) to bf16; the clips, the frozen LPIPS network
    # and the loss statistics stay fp32, and on CUDA the engine's forward switches off any autocast opened around it.
    # First seen on an H200: "Input type (float) and bias type (BFloat16)" at the first conv. Reproduced here by
    # casting the parameters and calling with autocast off.
    import torch

    from infra.config import load_config
    from vae.losses import SSVAELoss
    from infra.metrics.lpips import LPIPS
    from vae.model import SSVAE
    from vae.train import AutoencoderWithLoss
    from vae.train_config import VAETrainConfig

    cfg = load_config(VAETrainConfig, ROOT / "configs/vae/tiny.yaml",
                      ["data.video_roots=x", "data.image_roots=", "data.image_prob=0", *TINY,
                       "perceptual.pretrained=false", "loss.perceptual_weight=1.0", "loss.disc_start=0"])
    torch.manual_seed(0)
    loss = SSVAELoss(cfg.loss, LPIPS.from_config(cfg.perceptual))
    model = AutoencoderWithLoss(SSVAE(cfg.model.design), loss)
    for module in (model, loss.discriminator):
        for param in module.parameters():
            param.data = param.data.to(torch.bfloat16)
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.autocast("cpu", enabled=False):
        total, logs = model(x, step=1)
        total.backward()
        recon = model.reconstruct(x)
        disc_loss, disc_logs = loss.discriminator_loss(x, recon, step=2)
        disc_loss.backward()
    assert total.dtype == torch.float32 and math.isfinite(total.item()), logs
    assert math.isfinite(logs["loss/perceptual"]) and logs["loss/gan_generator"] != 0.0, logs
    assert recon.dtype == torch.float32 and recon.shape == x.shape
    assert math.isfinite(disc_loss.item()), disc_logs
    grads = {n: p.grad for n, p in model.vae.named_parameters() if p.requires_grad and n != "mask_token"}
    assert all(g is not None and g.dtype == torch.bfloat16 for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    assert sum(bool(g.abs().sum() > 0) for g in grads.values()) > 0.9 * len(grads)
    assert all(p.grad is not None for p in loss.discriminator.parameters())
