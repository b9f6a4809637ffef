"""Numerical checks on a CUDA device, which the CPU-only test suite cannot make. Prints one JSON object.

- SSVAE: the golden file (``../shared/reference/ssvae_golden_tiny.safetensors``) reproduced on the GPU in fp32
  (TF32 off) and under bf16 autocast; chunked encode/decode equal to one pass on the GPU.
- DiT: our CogVideoX transformer against diffusers' on the GPU, fp32 and bf16, SDPA (flash / memory-efficient kernels
  where torch picks them), forward and the gradient of one loss.

    python -m bench.check_cuda --golden ../shared/reference/ssvae_golden_tiny.safetensors

Each entry holds the max abs difference and the tolerance it is held to; ``ok`` is false when any is exceeded, and
the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@contextmanager
def _no_tf32():
    """TF32 (on by default for cuDNN convs) rounds fp32 products to 10 mantissa bits: off for the fp32 checks,
    restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _entry(diff: float, tol: float, **extra) -> dict:
    return {"max_abs_diff": diff, "tolerance": tol, "ok": diff <= tol, **extra}


def check_ssvae(golden: Path, device: torch.device) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from vae.inference import decode_raw_chunked, encode_moments_chunked
    from vae.official import load_official

    with safe_open(str(golden), "pt") as f:
        config = json.loads(f.metadata()["config"])
    tensors = {k: v.to(device) for k, v in load_file(str(golden)).items()}
    model = load_official(golden, config).to(device).eval()
    x, moments_ref, video_ref = tensors["io.input"], tensors["io.encoder_moments"], tensors["io.decoder_output"]
    z = moments_ref[:, :48]
    out = {}
    with _no_tf32(), torch.no_grad():
        out["golden_fp32_encoder"] = _entry((model.encoder(x) - moments_ref).abs().max().item(), 1e-4)
        out["golden_fp32_decoder"] = _entry((model.decoder(z) - video_ref).abs().max().item(), 1e-4)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            enc, dec = model.encoder(x).float(), model.decoder(z).float()
        # bf16 keeps ~3 significant digits: hold it to a tenth of the outputs' range (catches broken, not imprecise).
        out["golden_bf16_encoder"] = _entry((enc - moments_ref).abs().max().item(),
                                            0.1 * moments_ref.abs().max().item())
        out["golden_bf16_decoder"] = _entry((dec - video_ref).abs().max().item(), 0.1 * video_ref.abs().max().item())
        frames = x.shape[2]
        if frames >= 9:
            whole = model.encoder(x)
            chunked = encode_moments_chunked(model, x, chunk_latent_frames=1)
            out["chunked_encode_fp32"] = _entry((chunked - whole).abs().max().item(), 1e-4)
        if z.shape[2] >= 2:
            whole = model.decoder(z)
            chunked = decode_raw_chunked(model, z, chunk_latent_frames=1)
            out["chunked_decode_fp32"] = _entry((chunked - whole).abs().max().item(), 1e-4)
    return out


def check_dit(device: torch.device) -> dict:
    from diffusers import CogVideoXTransformer3DModel

    from dit import DiTConfig, diffusers_config, from_diffusers
    from dit.convert import diffusers_rotary_emb

    config = DiTConfig(num_layers=2, num_attention_heads=4, attention_head_dim=64, text_embed_dim=128,
                       in_channels=48, patch_size=1, positional_embedding="rope")
    torch.manual_seed(0)
    ref = CogVideoXTransformer3DModel(**diffusers_config(config))
    with torch.no_grad():  # diffusers zero-initialises some outputs: perturb so every path matters
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref = ref.to(device)
    ours = from_diffusers(ref).to(device)
    frames, height, width, text_len = 4, 12, 16, 24
    g = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(2, frames, 48, height, width, generator=g, device=device)
    text = torch.randn(2, text_len, 128, generator=g, device=device)
    timestep = torch.tensor([10, 700], device=device)
    rope = diffusers_rotary_emb(config, frames, height, width, device=device)
    out = {}
    with _no_tf32():
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            results = []
            for model, call in ((ref, lambda m, a, b: m(a, b, timestep, image_rotary_emb=rope, return_dict=False)[0]),
                                (ours, lambda m, a, b: m(a, b, timestep))):
                model.to(dtype).zero_grad(set_to_none=True)
                lat = latents.detach().to(dtype).clone().requires_grad_(True)
                y = call(model, lat, text.to(dtype))
                y.float().square().mean().backward()
                results.append((y.float().detach(), lat.grad.float()))
            (y_ref, g_ref), (y_ours, g_ours) = results
            # fp32: 1e-4 absolute on the output and relative on the gradient; bf16: a tenth of each one's scale.
            gscale = g_ref.abs().max().item()
            y_tol = 1e-4 if name == "fp32" else 0.1 * y_ref.abs().max().item()
            g_tol = (1e-4 if name == "fp32" else 0.1) * max(gscale, 1e-12)
            out[f"dit_forward_{name}"] = _entry((y_ours - y_ref).abs().max().item(), y_tol)
            out[f"dit_input_grad_{name}"] = _entry((g_ours - g_ref).abs().max().item(), g_tol, reference_max=gscale)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the point); cpu only to dry-run the script")
    parser.add_argument("--golden", type=Path,
                        default=ROOT.parent / "shared" / "reference" / "ssvae_golden_tiny.safetensors")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if not args.golden.is_file():
        parser.error(f"--golden: no file at {args.golden}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"device": name, "torch": torch.__version__}
    report["ssvae"] = check_ssvae(args.golden, device)
    report["dit"] = check_dit(device)
    report["ok"] = all(e["ok"] for part in ("ssvae", "dit") for e in report[part].values())
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
