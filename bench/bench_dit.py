"""Training-step speed and peak memory of our CogVideoX transformer vs diffusers' CogVideoXTransformer3DModel.

Both run the same configuration with the same weights (ours converted from the diffusers model), one
forward + backward of a mean-square loss per step, each in its own process so peak memory is its own.
Memory: the bytes autograd saves for the backward pass (both devices) and the peak (CUDA: allocator peak;
CPU: process peak RSS).
Prints one JSON object. On CPU it runs a small size (flags); with CUDA the default is CogVideoX-2B size in
bf16 (13 x 60 x 90 latents, 226 text tokens) and it adds tokens/s and model FLOPs utilisation.

    python bench/bench_dit.py                       # small CPU run
    python bench/bench_dit.py --size 2b             # CogVideoX-2B size (CUDA)

Seen on one H200 (torch 2.11, bf16, SDPA, no gradient checkpointing, batch 1, 13x60x90 latents + 226 text tokens =
17,776 tokens, median of 5 steps): ours 0.998 s/step, 17.8k tokens/s, 361 TFLOP/s (36.5 % MFU of 989), 47.6 GiB
saved activations, 48.4 GiB peak; diffusers 0.997 s/step, 361 TFLOP/s, 48.3 GiB peak: the same speed and memory
(both spend the step in the same cuBLAS GEMMs and SDPA flash kernels). bench/gpu_suite.sh runs this with the rest.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense bf16 tensor-core peak, TFLOP/s, by device-name substring (for MFU).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["small", "2b", "5b"], default=None,
                   help="model size: small (CPU default) or a CogVideoX preset (CUDA default: 2b)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--text-dim", type=int, default=64)
    p.add_argument("--positional-embedding", choices=["rope", "sincos"], default="rope")
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--in-channels", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=None, help="latent frames (small: 3, presets: 13)")
    p.add_argument("--height", type=int, default=None, help="latent height (small: 16, presets: 60)")
    p.add_argument("--width", type=int, default=None, help="latent width (small: 16, presets: 90)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (small: 16, presets: 226)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="CPU: float32, CUDA: bfloat16")
    p.add_argument("--attention-backend", choices=["sdpa", "flash"], default="sdpa")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--impl", choices=["both", "ours", "diffusers"], default="both")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by device name)")
    return p.parse_args(argv)


def resolve(args) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    size = args.size or ("2b" if cuda else "small")
    preset = size != "small"
    return dict(
        size=size, device="cuda" if cuda else "cpu",
        dtype=args.dtype or ("bfloat16" if cuda else "float32"),
        batch=args.batch,
        frames=args.frames or (13 if preset else 3),
        height=args.height or (60 if preset else 16),
        width=args.width or (90 if preset else 16),
        text_len=args.text_len or (226 if preset else 16),
        steps=args.steps, warmup=args.warmup,
        model=None if preset else dict(
            num_layers=args.layers, num_attention_heads=args.heads, attention_head_dim=args.head_dim,
            text_embed_dim=args.text_dim, positional_embedding=args.positional_embedding,
            patch_size=args.patch_size, in_channels=args.in_channels, time_embed_dim=4 * args.head_dim,
        ),
        attention_backend=args.attention_backend,
        gradient_checkpointing=args.gradient_checkpointing,
    )


def dit_config(run: dict):
    from dit import DiTConfig

    if run["model"] is None:
        cfg = DiTConfig.preset(f"cogvideox-{run['size']}")
    else:
        cfg = DiTConfig.preset("tiny", **run["model"])
    # The text length is the model's max_text_seq_length: diffusers' sin-cos table assumes it.
    return cfg.replace(max_text_seq_length=run["text_len"], sample_height=run["height"], sample_width=run["width"],
                       sample_frames=run["frames"])


def training_flops(cfg, batch: int, video_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one forward + backward (3x forward): per token and layer 24 D^2 (qkv, out, 4x MLP),
    per token pair 4 D (scores and weighted sum), plus the text, patch and output projections."""
    d, s = cfg.inner_dim, video_tokens + text_tokens
    patch = cfg.in_channels * cfg.temporal_patch * cfg.patch_size**2
    per_layer = 24 * d * d * s + 4 * s * s * d
    io = 2 * text_tokens * cfg.text_embed_dim * d + 2 * video_tokens * d * patch * 2
    return 3.0 * batch * (cfg.num_layers * per_layer + io)


def saved_activation_bytes(step) -> int:
    """Bytes of the tensors autograd keeps for the backward pass during step() (each storage once): the
    activation memory of training, measurable on CPU where there is no allocator high-water mark."""
    import torch

    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def _peak_rss_bytes() -> int:
    """Process high-water RSS (VmHWM): includes the libraries and the model, so it compares two runs only
    roughly; ``saved_activation_bytes`` is the precise CPU figure."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(impl: str, run: dict, queue) -> None:
    """Child process: build one implementation, time forward+backward steps, report peak memory."""
    import torch

    torch.manual_seed(0)
    device, dtype = torch.device(run["device"]), getattr(torch, run["dtype"])
    cfg = dit_config(run)
    from diffusers import CogVideoXTransformer3DModel

    from dit import diffusers_config, from_diffusers
    from dit.convert import diffusers_rotary_emb

    with torch.device(device):
        model = CogVideoXTransformer3DModel(**diffusers_config(cfg))
        if impl == "ours":
            model = from_diffusers(model, attention_backend=run["attention_backend"],
                                   gradient_checkpointing=run["gradient_checkpointing"])
        elif run["gradient_checkpointing"]:
            model.enable_gradient_checkpointing()
    model = model.to(dtype).train()
    g = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(run["batch"], run["frames"], cfg.in_channels, run["height"], run["width"], generator=g,
                          device=device, dtype=dtype)
    text = torch.randn(run["batch"], run["text_len"], cfg.text_embed_dim, generator=g, device=device, dtype=dtype)
    timestep = torch.randint(0, 1000, (run["batch"],), generator=g, device=device)
    rope = diffusers_rotary_emb(cfg, run["frames"], run["height"], run["width"], device=device)

    def step():
        if impl == "ours":
            out = model(latents, text, timestep)
        else:
            out = model(latents, text, timestep, image_rotary_emb=rope, return_dict=False)[0]
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(run["warmup"]):
        step()
    sync()
    activations = saved_activation_bytes(step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(run["steps"]):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss_bytes()  # whole process, libraries included
    video_tokens = (run["frames"] // cfg.temporal_patch) * (run["height"] // cfg.patch_size) * (run["width"] // cfg.patch_size)
    result = dict(
        step_s_median=statistics.median(times), step_s_min=min(times),
        saved_activations_gib=activations / 2**30,
        peak_mem_gib=peak / 2**30, peak_mem_kind="cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        params=sum(p.numel() for p in model.parameters()), video_tokens=video_tokens,
        flops_per_step=training_flops(cfg, run["batch"], video_tokens, run["text_len"]),
    )
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak_tflops = run.get("peak_tflops") or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        step_s = result["step_s_median"]
        result["tokens_per_s"] = run["batch"] * (video_tokens + run["text_len"]) / step_s
        result["tflops_per_s"] = result["flops_per_step"] / step_s / 1e12
        result["mfu"] = None if peak_tflops is None else result["tflops_per_s"] / peak_tflops
        result["device_name"] = name
    queue.put((impl, result))


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = resolve(args)
    run["peak_tflops"] = args.peak_tflops
    impls = ["ours", "diffusers"] if args.impl == "both" else [args.impl]
    ctx = mp.get_context("spawn")
    results = {}
    for impl in impls:
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(impl, run, queue))
        proc.start()
        name, result = queue.get()
        proc.join()
        results[name] = result
    report = {"run": run, "results": results}
    if len(results) == 2:
        report["ours_over_diffusers"] = {
            "step_time": results["ours"]["step_s_median"] / results["diffusers"]["step_s_median"],
            "saved_activations": results["ours"]["saved_activations_gib"] / results["diffusers"]["saved_activations_gib"],
            "peak_mem": results["ours"]["peak_mem_gib"] / results["diffusers"]["peak_mem_gib"],
        }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
