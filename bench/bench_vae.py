"""Video VAE speed: encode and decode seconds per clip and peak memory, SSVAE vs diffusers Wan 2.2 and CogVideoX.

All models have random weights (speed does not depend on them). fp32 on CPU, bf16 autocast on GPU. Each model
runs in its own spawned process so that the CPU peak (max RSS) of one does not hide another's.

    python bench/bench_vae.py                         # 1x3x17x256x256, all three models (minutes on CPU)
    python bench/bench_vae.py --frames 5 --size 64    # quick check
    python bench/bench_vae.py --models ssvae --threads 2

Prints one JSON object. Numbers seen, seconds encode / decode at 1x3x17x256x256:

| run (one run each; same-run numbers compare)       | SSVAE (ours)  | Wan 2.2       | CogVideoX      |
|----------------------------------------------------|---------------|---------------|----------------|
| 2-core CPU, fp32, idle, contiguous conv layout     | 59.6 / 77.9   | 28.1 / 190.3  | 90.4 / 211.3   |
| 2-core CPU, fp32, idle, channels-last-3d (default) | 48.5-51.9 / 66.8-77.1 | -     | -              |
| H200, bf16 autocast, best of 3                     | 0.030 / 0.052 | 0.038 / 0.090 | 0.076 / 0.181  |
| H200, bf16, 1x3x49x512x512, one run                | 0.317 / 0.525 | 0.258 / 0.807 | -              |

Against the reference implementation (zai-org/SSVAE `dc_3dvae.py` Encoder3D/Decoder3D, released configuration, run
side by side in one script outside this repository, which does not vendor it; outputs agree to 4e-6 with the same
weights): reference 63.0 / 86.9 s, ours 35.2 / 64.0 s, peak RSS 4.1 vs 3.5 GB (2-core CPU, fp32, one run each; a
test run overlapped the reference's encode, so that one number is high). ENVIRONMENT.md saw the reference at
42 / 65 s on a day when Wan 2.2 gave 26 / 123 and CogVideoX 68 / 151 (a machine 1.1-1.5x faster than above). Profiling
(torch.profiler) put 80-85 % of the SSVAE's CPU time in the 3D convolutions; oneDNN runs them ~20 % faster on
channels-last-3d input, and keeping every activation in that one layout avoids slow mixed-layout elementwise ops,
hence `vae.causal_conv.CausalConv3d.channels_last` (numbers unchanged to 1e-5: tests/test_vae_official.py). On the
GPU the layout changes speed little (17x256: 31 / 52 ms contiguous) but lowers peak memory (49x512: encode 15.5 vs
18.7 GB, decode 22.0 vs 26.8 GB). Peak GPU memory of one whole-video pass grows with the clip: use
`vae.inference` chunking for long clips (Wan's decoder streams frame by frame: 6.1 / 9.3 GB at 49x512).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

# Spawned workers re-import this file: make the repo importable there too.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("ssvae", "wan2.2", "cogvideox")


def build_model(name: str):
    import torch

    torch.manual_seed(0)
    if name == "ssvae":
        from vae.model import SSVAE

        model = SSVAE()  # released configuration

        def encode(x):
            return model.encoder(x)[:, :48]

        def decode(z):
            return model.decoder(z)

    elif name == "wan2.2":
        from diffusers import AutoencoderKLWan

        model = AutoencoderKLWan(
            base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2, in_channels=12,
            out_channels=12, scale_factor_spatial=16, scale_factor_temporal=4, dim_mult=[1, 2, 4, 4],
            num_res_blocks=2, temperal_downsample=[False, True, True], latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
        )

        def encode(x):
            return model.encode(x).latent_dist.mode()

        def decode(z):
            return model.decode(z).sample

    elif name == "cogvideox":
        from diffusers import AutoencoderKLCogVideoX

        model = AutoencoderKLCogVideoX()

        def encode(x):
            return model.encode(x).latent_dist.mode()

        def decode(z):
            return model.decode(z).sample

    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    return model.eval(), encode, decode


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(name: str, frames: int, size: int, threads: int, repeats: int, channels_last: bool, queue) -> None:
    import torch

    from vae.causal_conv import CausalConv3d

    CausalConv3d.channels_last = channels_last  # SSVAE only: the layout its convs run in
    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model, encode, decode = build_model(name)
    model.to(device)
    params = sum(p.numel() for p in model.parameters())
    x = torch.rand(1, 3, frames, size, size, device=device) * 2 - 1
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def timed(fn, arg):
        best, out = float("inf"), None
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn(arg)
            if cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best, out

    result = {"params": params}
    with torch.no_grad(), autocast:
        if cuda:  # warm-up (cuDNN algorithm choice, lazy init)
            decode(encode(x))
            torch.cuda.reset_peak_memory_stats()
        rss_before = _max_rss_mb()
        result["encode_s"], z = timed(encode, x)
        result["latent_shape"] = list(z.shape)
        if cuda:
            result["encode_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            result["encode_peak_rss_mb"] = _max_rss_mb()
        result["decode_s"], y = timed(decode, z)
        result["output_shape"] = list(y.shape)
        if cuda:
            result["decode_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            result["decode_peak_rss_mb"] = _max_rss_mb()
            result["rss_after_build_mb"] = rss_before
    queue.put(result)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per measurement; the best is reported")
    parser.add_argument("--memory-format", choices=["channels_last_3d", "contiguous"], default="channels_last_3d",
                        help="layout of the SSVAE's conv inputs (vae.causal_conv.CausalConv3d.channels_last)")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in names:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {MODELS}")
    if (args.frames - 1) % 4 or args.size % 16:
        parser.error("--frames must be 1 + 4k and --size a multiple of 16")

    import torch

    ctx = mp.get_context("spawn")
    report = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "dtype": "bf16-autocast" if torch.cuda.is_available() else "float32",
        "input_shape": [1, 3, args.frames, args.size, args.size],
        "threads": args.threads,
        "ssvae_memory_format": args.memory_format,
        "models": {},
    }
    for name in names:
        queue = ctx.Queue()
        proc = ctx.Process(target=run_one, args=(name, args.frames, args.size, args.threads, args.repeats,
                                                    args.memory_format == "channels_last_3d", queue))
        proc.start()
        proc.join()
        report["models"][name] = queue.get() if proc.exitcode == 0 else {"error": f"exit code {proc.exitcode}"}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
