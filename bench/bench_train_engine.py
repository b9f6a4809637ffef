"""Both trainings as a user launches them (the `deepspeed` launcher, the engine, ZeRO, checkpoints), measured: step
time, throughput, peak memory, losses, and a checkpoint/resume compared step by step with the uninterrupted run.

    python -m bench.bench_train_engine --task vae --scale released   # GPU: stage-1 SSVAE (315M), 17x256, bf16,
                                                                     # LPIPS + LCR + LMR, PatchGAN from step 10
    python -m bench.bench_train_engine --task dit --scale 2b         # GPU: CogVideoX-2B on SSVAE latents
                                                                     # (48 x 13 x 30 x 45 + 226 text tokens), bf16
    python -m bench.bench_train_engine --task vae --scale tiny       # CPU dry run of the same path, tiny sizes

Prints one JSON object. Everything it needs is made on the spot, so it runs where no data or weights are:
- VAE: default-data clips at the scale's size. LPIPS uses the pinned VGG16 weights when installed, else the same
  network with random weights (same compute; ``perceptual_pretrained`` in the JSON says which).
- DiT: a random first stage of the scale's design (for the shape checks; latents are not encoded), a random one-layer
  T5 with a word-level tokenizer (the DiT only sees its 4096-wide states), and a cache of random latents and text
  states (``dit.latent_cache.write_random_cache``): the step, the engine and the loader are the real ones.

Runs: ``whole`` trains ``--steps`` steps, saving at ``--save-at``; ``parts`` stops after ``--save-at`` and resumes.
``resume.max_abs_diff`` compares their logged losses at every later step (0.0 = bit-identical).

Seen on one H200 (2026-12-04, torch 2.11, deepspeed 0.19.8, bf16, ZeRO-2, deepspeed.fused_optimizer=no, batch 1):
- DiT, ``--scale 2b --steps 10 --resume-layers 2 model.gradient_checkpointing=false``: 1.15 s/step (median of steps
  4-10), 15.5k tokens/s, 313 model TFLOP/s = 39.6 % MFU of the measured 790 TFLOP/s bf16 GEMM rate (31.6 % of the
  datasheet's 989), peak 69.3 GiB; bench_dit's bare model on the same shapes: 0.997 s, 48.4 GiB (engine overhead
  15 %; the extra memory is ZeRO-2's fp32 master weights and Adam moments, 12 bytes x 1.69B). The final 2B save
  (~28 GB) took about 30 s. Losses finite (flat: the recipe's 1000-step warm-up holds lr near 1e-6).
- VAE, ``--scale released --steps 16 --save-at 10 --disc-start 6 optimizer.warmup_steps=0
  disc_optimizer.warmup_steps=0``: generator step 0.82 s, discriminator step 0.13 s, peak 33.4 GiB; L1 0.67 -> 0.13
  by step 6, then 0.15-0.48 by clip; LCR active (0.56k -> 1.5). An interrupted run's first 10 losses equal the whole
  run's; the resumed half was cut by the suite's time box, so the GPU resume comparison is still to be read.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infra.distributed import free_port  # noqa: E402  (after the path insert: run as a script or a module)

SCALES = {"vae": ("released", "tiny"), "dit": ("2b", "tiny")}
LOSS_KEYS = {"vae": "loss/total", "dit": "loss"}


def launch(module: str, config: Path, overrides: list[str], launcher: str, timeout: float, log: Path) -> float:
    """Run a training; returns its wall time, raising with the log's tail on failure."""
    if launcher == "deepspeed":  # the `deepspeed` script's own entry point (pip --target installs leave no script)
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
               str(free_port()), "--module", module]
    else:
        cmd = [sys.executable, "-m", module]
    cmd += ["--config", str(config), *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(log, "a") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; log {log}:\n{tail}")
    return time.perf_counter() - start


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ------------------------------------------------------------------------------------------------------ VAE
def vae_setup(scale: str, work: Path, steps: int, save_at: int, cuda: bool, disc_start: int
              ) -> tuple[Path, list[str], dict]:
    from infra.assets import asset_available
    from tools.make_default_data import make_default_data

    size, frames, clips = (256, 17, 16) if scale == "released" else (64, 9, 8)
    make_default_data(work / "data", num_videos=clips, num_images=0, size=size, frames=frames, fps=8, seed=0,
                      shard_size=clips, show_progress=False)
    pretrained = asset_available("lpips/vgg16")
    overrides = [f"data.video_roots={work / 'data'}", "data.image_roots=", "data.image_prob=0",
                 f"run.max_steps={steps}", f"run.save_every={save_at}", "run.eval_every=0", "run.log_every=1",
                 "run.progress_bar=false", "run.ema_decay=0", f"loss.disc_start={disc_start}",
                 f"perceptual.pretrained={str(pretrained).lower()}",
                 f"deepspeed.precision={'bf16' if cuda else 'fp32'}"]
    if scale == "released":
        config = ROOT / "configs/vae/stage1_256p.yaml"
        overrides += ["data.num_workers=4"]
    else:  # the tiny config without its CPU shortcuts: LPIPS and the PatchGAN on, as in the released recipe
        import yaml

        # Whole 64 px frames (the PatchGAN needs at least 48 px), with LMR settings for that resolution (integer
        # keys, which a key=value override cannot write).
        tiny = yaml.safe_load((ROOT / "configs/vae/tiny.yaml").read_text())
        tiny["loss"]["lmr"] = {"mask_probs": {64: [0.7, 0.1, 0.1, 0.1]}, "block_sizes": {64: [1, 1, 1]}}
        config = work / "vae_tiny.yaml"
        config.write_text(yaml.safe_dump(tiny))
        overrides += ["loss.perceptual_weight=0.1", "loss.disc_weight=0.1", "eval.video_roots=", "data.height=64",
                      "data.width=64"]
    return config, overrides, {"clip": [frames, size, size], "perceptual_pretrained": pretrained}


# ------------------------------------------------------------------------------------------------------ DiT
def random_t5(folder: Path, width: int) -> Path:
    """A one-layer T5 encoder of ``width`` with a word-level tokenizer: the DiT needs only states of that width."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>"] + "a the red green blue cat dog runs walks over beach forest car".split()
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    config = T5Config(vocab_size=len(words), d_model=width, d_kv=64, d_ff=width, num_layers=1,
                      num_heads=max(width // 64, 1))
    T5EncoderModel(config).save_pretrained(folder)
    return folder


def random_ssvae(folder: Path, scale: str) -> tuple[Path, object]:
    """A random SSVAE of the released design (2b) or a tiny 16x one (tiny), with unit latent statistics."""
    import torch

    from infra.config import load_config
    from vae.config import DecoderConfig, EncoderConfig, SSVAEConfig
    from vae.model import SSVAE
    from vae.train_config import VAETrainConfig

    if scale == "2b":
        config = load_config(VAETrainConfig, ROOT / "configs/vae/stage1_256p.yaml",
                             ["data.video_roots=x", "data.image_roots=x"]).model
    else:
        common = dict(ch=4, ch_mult=(2, 4, 8, 16, 16), num_res_blocks=1, num_mid_blocks=1, z_channels=48)
        config = SSVAEConfig(encoder=EncoderConfig(**common), decoder=DecoderConfig(**common))
    model = SSVAE(config)
    model.set_latent_stats(torch.zeros(model.z_channels), torch.ones(model.z_channels))
    model.save_pretrained(folder)
    return folder, model


def dit_setup(scale: str, work: Path, steps: int, save_at: int, cuda: bool, disc_start: int
              ) -> tuple[Path, list[str], dict]:
    from bench.bench_dit import training_flops
    from dit.latent_cache import write_random_cache
    from dit.parallelize import video_tokens
    from dit.train_config import T2VTrainConfig
    from infra.config import load_config
    from vae.first_stage import SSVAEFirstStage

    if scale == "2b":
        config, width, (frames, height, width_px), batch = ROOT / "configs/t2v/cogvideox_2b_ssvae.yaml", 4096, \
            (49, 480, 720), 1
    else:
        config, width, (frames, height, width_px), batch = ROOT / "configs/t2v/tiny.yaml", 64, (9, 64, 64), 4
    vae_dir, vae = random_ssvae(work / "vae", scale)
    first_stage = SSVAEFirstStage(vae)
    t5 = random_t5(work / "t5", width)
    latent = first_stage.latent_shape(frames, height, width_px)
    overrides = [f"first_stage.path={vae_dir}", "first_stage.dtype=float32", "text_encoder.kind=t5",
                 f"text_encoder.path={t5}", f"latents.cache_dir={work / 'latents'}", f"data.video_roots={work}",
                 f"data.num_frames={frames}", f"data.height={height}", f"data.width={width_px}",
                 f"data.video_batch_size={batch}", "data.num_workers=0", "sampling.enabled=false",
                 f"run.max_steps={steps}", f"run.save_every={save_at}", "run.eval_every=0",
                 "run.eval_at_start=false", "run.log_every=1", "run.progress_bar=false", "run.ema_decay=0",
                 f"deepspeed.precision={'bf16' if cuda else 'fp32'}"]
    cfg = load_config(T2VTrainConfig, config, overrides)
    write_random_cache(cfg, work / "latents", num_samples=max(8, 4 * batch), latent_shape=latent,
                       text_embed_dim=width)
    model = cfg.model.build(vae.z_channels, vae.spatial_compression, width, cfg.text_encoder.max_length)
    tokens = video_tokens(model, first_stage, frames, height, width_px)
    flops = training_flops(model, batch, tokens, cfg.text_encoder.max_length)
    return config, overrides, {"latents": list(latent), "text_tokens": cfg.text_encoder.max_length,
                               "video_tokens": tokens, "batch": batch, "num_layers": model.num_layers,
                               "gradient_checkpointing": model.gradient_checkpointing,
                               "model_flops_per_step": flops}


# ----------------------------------------------------------------------------------------------------- main
def summarize(task: str, whole: list[dict], parts: list[dict], save_at: int) -> dict:
    """Losses of the uninterrupted run, and the resumed run's losses after ``save_at`` compared step by step."""
    key = LOSS_KEYS[task]
    losses = {r["step"]: r[key] for r in whole if key in r}
    resumed = {r["step"]: r[key] for r in parts if key in r}
    later = [s for s in sorted(losses) if s > save_at and s in resumed]
    values = [losses[s] for s in sorted(losses)]
    third = max(len(values) // 3, 1)
    return {
        "steps_logged": len(values),
        "losses_finite": all(math.isfinite(v) for v in values),
        "loss_first_third_mean": statistics.fmean(values[:third]) if values else None,
        "loss_last_third_mean": statistics.fmean(values[-third:]) if values else None,
        "resume": {"compared_steps": later,
                   "max_abs_diff": max((abs(losses[s] - resumed[s]) for s in later), default=None),
                   "bit_identical": bool(later) and all(losses[s] == resumed[s] for s in later)},
    }


def speed(task: str, metrics: list[dict], info: dict, warmup: int, profiled_from: int = 0) -> dict:
    """Step time, throughput, peak memory and (DiT) MFU of one run's logged steps after ``warmup`` (and before
    ``profiled_from``, when steps were profiled: the profiler slows them)."""
    timed = [r for r in metrics if "step_s" in r and r["step"] > warmup
             and not (profiled_from and r["step"] >= profiled_from)]
    step_s = statistics.median(r["step_s"] for r in timed) if timed else None
    out = {"step_s_median": step_s, "samples_per_s_median":
           statistics.median(r["samples_per_s"] for r in timed) if timed else None,
           "peak_memory_gib": max((r["mem/peak_gib"] for r in metrics if "mem/peak_gib" in r), default=None)}
    if task == "dit" and step_s:
        tflops = info["model_flops_per_step"] / step_s / 1e12
        out.update(tokens_per_s=info["batch"] * (info["video_tokens"] + info["text_tokens"]) / step_s,
                   model_tflops_per_s=tflops,
                   # Model FLOPs (no recompute counted) over the measured bf16 GEMM rate (8192^3 bf16 matmul on
                   # the H200: ~790 TFLOP/s) and over the datasheet's dense 989.
                   mfu_vs_measured_790=tflops / 790.0, mfu_vs_datasheet_989=tflops / 989.0)
    return out


def top_ops(run: Path, rows: int = 25) -> dict:
    """The head of the run's profiler table (``infra.step_profiler``), when it profiled."""
    path = run / "profile" / "ops.txt"
    return {"profile_top_ops": path.read_text().splitlines()[:rows + 4]} if path.is_file() else {}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(SCALES), required=True)
    parser.add_argument("--scale", required=True, help="vae: released | tiny; dit: 2b | tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save-at", type=int, default=20)
    parser.add_argument("--disc-start", type=int, default=10, help="VAE: the PatchGAN's first step")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the step-time median")
    parser.add_argument("--resume-layers", type=int, default=0,
                        help="DiT: time a full-size run (one checkpoint, at the end), then check resume on a model "
                             "of this many layers (a 2B checkpoint with optimizer states is ~28 GB per save)")
    parser.add_argument("--profile", type=int, default=0,
                        help="profile this many last steps of the timed run (run.profile_at): the top operators go "
                             "into the JSON, ops.txt and trace.json stay in the run folder")
    parser.add_argument("--launcher", choices=("deepspeed", "python"), default="deepspeed")
    parser.add_argument("--work", default="runs/bench_train_engine")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per training run")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args(argv)
    if args.scale not in SCALES[args.task]:
        parser.error(f"--scale for --task {args.task} must be one of {SCALES[args.task]}, got {args.scale!r}")
    if not 0 < args.save_at < args.steps:
        parser.error(f"--save-at must be in (0, --steps), got {args.save_at} with --steps {args.steps}")
    if args.resume_layers and args.task != "dit":
        parser.error("--resume-layers is for --task dit")
    if not 0 <= args.profile <= args.steps - args.warmup - 2:
        parser.error(f"--profile must leave at least 2 timed steps after --warmup {args.warmup}, got {args.profile}")
    import torch

    cuda = torch.cuda.is_available()
    work = Path(args.work) / f"{args.task}_{args.scale}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    setup = vae_setup if args.task == "vae" else dit_setup
    config, overrides, info = setup(args.scale, work, args.steps, args.save_at, cuda, args.disc_start)
    overrides += args.overrides
    module = "vae.train" if args.task == "vae" else "dit.train"
    log = work / "train.log"
    result = {"task": args.task, "scale": args.scale, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "launcher": args.launcher, "precision": "bf16" if cuda else "fp32",
              "steps": args.steps, "save_at": args.save_at, "extra_overrides": args.overrides, **info}
    profiled_from = args.steps - args.profile + 1 if args.profile else 0
    profile = [f"run.profile_at={profiled_from}", f"run.profile_steps={args.profile}"] if args.profile else []
    if args.resume_layers:
        run = work / "speed"
        wall = launch(module, config, [f"run.output_dir={run}", *overrides, *profile, "run.save_every=0"],
                      args.launcher, args.timeout, log)
        result.update(wall_s_speed_run=round(wall, 1),
                      **speed(args.task, read_metrics(run), info, args.warmup, profiled_from), **top_ops(run))
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # tens of GB at 2B
        overrides += [f"model.overrides.num_layers={args.resume_layers}"]
        result["resume_check_num_layers"] = args.resume_layers
    whole, parts = work / "whole", work / "parts"
    timed_profile = [] if args.resume_layers else profile
    wall = launch(module, config, [f"run.output_dir={whole}", *overrides, *timed_profile], args.launcher, args.timeout,
                  log)
    launch(module, config, [f"run.output_dir={parts}", *overrides, f"run.stop_after={args.save_at}"],
           args.launcher, args.timeout, log)
    launch(module, config, [f"run.output_dir={parts}", *overrides], args.launcher, args.timeout, log)
    whole_metrics = read_metrics(whole)
    if not args.resume_layers:
        result.update(wall_s_whole_run=round(wall, 1),
                      **speed(args.task, whole_metrics, info, args.warmup, profiled_from), **top_ops(whole))
    result.update(summarize(args.task, whole_metrics, read_metrics(parts), args.save_at))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
