"""Is it faster to train two runs at once, one thread each, than one run at a time on every thread?

The tiny study answers yes through ``launcher.parallel_runs`` (its VAEs, then its DiTs, two at a time on 2 cores).
This measures it on the machine at hand: the same training step (``bench.bench_tiny_training``: the study's SSVAE
at 4x16x16 on 64x64 crops, and the tiny DiT at 48 tokens per clip) timed in one process with ``--threads`` threads
("solo"), then in two processes at once with half the threads each ("pair"), side by side in one run.

    python -m bench.bench_parallel_runs [--threads 2] [--steps 20]      # prints one JSON object

``pair_throughput_vs_solo`` is (2 / a pair process's s/step) / (1 / the solo's s/step): above 1, parallel_runs=2
trains more steps per hour. Seen on the 2-core CPU (2026-12-07, 20 steps, 70 s in all): the VAE 0.71 s/step solo,
1.19 s each of the pair, 1.19x; the DiT 0.128 s solo, 0.205 s each of the pair, 1.25x. ``vae.train`` itself, 100
steps with its data loading: 1.26x (docs/STUDY.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from infra.child_env import python_child_env

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("vae", "dit")


def worker(model: str, steps: int, warmup: int) -> dict:
    """One training step's median time in this process (torch takes its threads from OMP_NUM_THREADS)."""
    from bench.bench_tiny_training import dit_step_time, vae_step_time
    from dit.train_config import T2VTrainConfig
    from infra.config import load_config
    from vae.train_config import VAETrainConfig

    if model == "vae":
        cfg = load_config(VAETrainConfig, ROOT / "configs/vae/tiny_ssvae.yaml")
        d = cfg.data
        return vae_step_time(cfg, d.video_batch_size, d.num_frames, d.height, d.width, steps, warmup)
    return dit_step_time(load_config(T2VTrainConfig, ROOT / "configs/t2v/tiny.yaml"), steps, warmup)


def _launch(model: str, threads: int, steps: int, warmup: int) -> subprocess.Popen:
    env = python_child_env(OMP_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, "-m", "bench.bench_parallel_runs", "--worker", model, "--steps",
                             str(steps), "--warmup", str(warmup)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            text=True)


def _collect(process: subprocess.Popen) -> dict:
    out, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(process.args)} failed with exit code {process.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def compare(model: str, threads: int, steps: int, warmup: int) -> dict:
    """Solo (all threads) then pair (two processes at once, half the threads each) for one model."""
    half = threads // 2  # main() refuses fewer than 2 threads
    solo = _collect(_launch(model, threads, steps, warmup))["s_per_step"]
    pair = [_collect(p)["s_per_step"] for p in [_launch(model, half, steps, warmup) for _ in range(2)]]
    # The slower of the two sets the pair's pace.
    return {"solo_s_per_step": solo, "solo_threads": threads, "pair_s_per_step": pair, "pair_threads_each": half,
            "pair_throughput_vs_solo": 2 * solo / max(pair)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="threads of the solo run (each of the pair gets half)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {MODELS}")
    p.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = worker(args.worker, args.steps, args.warmup)
        print(json.dumps(result))
        return result
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        p.error(f"--models: expected names from {MODELS}, got {args.models!r}")
    if args.threads < 2:
        p.error(f"--threads: a pair needs at least 2 threads to split, got {args.threads}")
    out = {"cpu_count": os.cpu_count(), "steps": args.steps,
           **{model: compare(model, args.threads, args.steps, args.warmup) for model in models}}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
