"""Spectral analysis of video latents: how much low-frequency bias, how few channel modes.

The paper's claim is that latents which are easy to diffuse have (i) spatio-temporal spectra biased towards low
frequencies and (ii) a channel eigenspectrum dominated by a few modes. For latents (N, C, T, H, W) this module measures:

**Frequency spectrum.** Each channel is standardised over (N, T, H, W) (so every channel counts equally and the
global per-channel mean, a pure offset, is removed); the power ``|FFT_3d|^2 / (T H W)`` over (T, H, W) is averaged over
samples and channels. By Parseval the mean power is the signal's variance (1), and white noise has power 1 at every
frequency (except the DC bin, which only holds how sample means spread around the global mean: 1 - 1/N for
N white-noise samples). Frequencies are normalised so the Nyquist frequency of an axis is 1: the spatial radius is
``rho = sqrt(fy^2 + fx^2) / 0.5`` with f in cycles per sample, the temporal frequency ``|ft| / 0.5``.
- ``radial_profile``: mean power per spatial-radius bin over all temporal frequencies, for rho in [0, 1] (the
  corners beyond 1 have incomplete rings and are left out of the profile, not out of the shares).
- ``temporal_profile``: mean power per temporal frequency over all spatial frequencies.
- ``low_freq_share``: share of the total energy at spatial radius rho < ``cutoff`` (default 0.25, i.e. a quarter of
  the spatial Nyquist frequency), all temporal frequencies included; ``low_freq_share_flat`` is the same share for a
  flat (white) spectrum on the same grid (the fraction of frequency bins below the cut-off), and
  ``low_freq_ratio = share / flat`` (1 for white noise, larger for a low-frequency bias). ``temporal_low_freq_*``
  are the same with ``|ft| / 0.5 < cutoff``.

**Channel eigenspectrum.** Eigenvalues of the C x C covariance of channel vectors (each latent position is one
sample of C values, mean removed per channel), in decreasing order: ``explained`` (eigenvalue / sum), ``top_k_share``
(variance share of the k largest modes), ``effective_rank = exp(H(p))`` with ``p`` the normalised eigenvalues and H the
Shannon entropy (Roy & Vetterli 2007: C for isotropic latents, 1 when one mode holds everything), and
``participation_ratio = (sum l)^2 / sum l^2``.

CLI: encode the same clips with several VAEs (``--vae name=kind:path``) or read stored latents
(``--latents name=file.safetensors``, tensor ``latents``), write ``spectral.json`` and PNG plots overlaying them:

    python -m tools.spectral --data data/default --vae ssvae=ssvae:runs/vae/export --vae wan=wan:weights/wan \
        --num-clips 16 --frames 17 --size 128 --out reports/spectral
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tools.latent_stats import latent_statistics


@dataclass
class SpectralConfig:
    cutoff: float = 0.25  # normalised frequency below which energy counts as low-frequency
    radial_bins: int = 0  # spatial radius bins in [0, 1]; 0: one per frequency step, min(H, W) // 2
    top_k: list[int] = field(default_factory=lambda: [1, 4, 8, 16])
    correlation: bool = False  # eigenspectrum of the channel correlation instead of the covariance
    chunk: int = 8  # samples transformed at once (memory)

    def validate(self) -> None:
        if not 0 < self.cutoff <= 1:
            raise ValueError(f"cutoff must be in (0, 1], got {self.cutoff}")
        if self.radial_bins < 0:
            raise ValueError(f"radial_bins must be >= 0, got {self.radial_bins}")
        if not self.top_k or any(k < 1 for k in self.top_k):
            raise ValueError(f"top_k must be a non-empty list of integers >= 1, got {self.top_k}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")


def _check_latents(latents: torch.Tensor) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a tensor (N, C, T, H, W), got {shape}")
    if not torch.isfinite(latents).all():
        raise ValueError("latents hold NaN or infinite values")
    return latents.detach().to(torch.float64)


def _normalised_frequencies(t: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial radius (H, W) and temporal frequency (T,) of the FFT bins, Nyquist = 1."""
    fy, fx = torch.fft.fftfreq(h, dtype=torch.float64), torch.fft.fftfreq(w, dtype=torch.float64)
    rho = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5
    return rho, torch.fft.fftfreq(t, dtype=torch.float64).abs() / 0.5


def power_spectrum(latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Mean power (T, H, W) over samples and channels of the per-channel standardised latents."""
    x = _check_latents(latents)
    n, _, t, h, w = x.shape
    mean = x.mean(dim=(0, 2, 3, 4), keepdim=True)
    std = x.std(dim=(0, 2, 3, 4), keepdim=True, unbiased=False).clamp_min(1e-12)
    power = torch.zeros(t, h, w, dtype=torch.float64)
    for start in range(0, n, chunk):
        part = (x[start:start + chunk] - mean) / std
        spectrum = torch.fft.fftn(part, dim=(-3, -2, -1))
        power += (spectrum.abs() ** 2).sum(dim=(0, 1)) / (t * h * w)
    return power / (n * x.shape[1])


def frequency_spectrum(latents: torch.Tensor, cfg: SpectralConfig | None = None) -> dict:
    """Radial and temporal power profiles and low-frequency shares of latents (N, C, T, H, W); see the module doc."""
    cfg = cfg or SpectralConfig()
    cfg.validate()
    power = power_spectrum(latents, cfg.chunk)
    t, h, w = power.shape
    rho, ft = _normalised_frequencies(t, h, w)
    total = power.sum()

    bins = cfg.radial_bins or max(min(h, w) // 2, 1)
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    # Close the last bin at 1 so the Nyquist ring of a square grid is counted.
    index = torch.bucketize(rho, edges, right=True) - 1
    index[rho == 1.0] = bins - 1
    spatial = power.mean(dim=0)  # (H, W), averaged over temporal frequencies
    radial = []
    for b in range(bins):
        inside = index == b
        radial.append(float(spatial[inside].mean()) if inside.any() else None)

    temporal_freqs = sorted(set(ft.tolist()))
    temporal = [float(power[ft == f].mean()) for f in temporal_freqs]

    low = rho < cfg.cutoff
    share = float(power[:, low].sum() / total)
    flat = float(low.double().mean())
    t_low = ft < cfg.cutoff
    t_share = float(power[t_low].sum() / total)
    t_flat = float(t_low.double().mean())
    return {
        "cutoff": cfg.cutoff,
        "radial_frequency": ((edges[:-1] + edges[1:]) / 2).tolist(),
        "radial_profile": radial,
        "temporal_frequency": temporal_freqs,
        "temporal_profile": temporal,
        "low_freq_share": share,
        "low_freq_share_flat": flat,
        "low_freq_ratio": share / flat if flat > 0 else None,
        "temporal_low_freq_share": t_share,
        "temporal_low_freq_share_flat": t_flat,
        "temporal_low_freq_ratio": t_share / t_flat if t_flat > 0 else None,
    }


def channel_eigenspectrum(latents: torch.Tensor, cfg: SpectralConfig | None = None) -> dict:
    """Eigenvalues of the channel covariance of latents (N, C, T, H, W) and how concentrated they are."""
    cfg = cfg or SpectralConfig()
    cfg.validate()
    x = _check_latents(latents)
    c = x.shape[1]
    samples = x.transpose(0, 1).reshape(c, -1)
    if samples.shape[1] < 2:
        raise ValueError("latents must hold at least 2 positions to estimate a covariance")
    samples = samples - samples.mean(dim=1, keepdim=True)
    if cfg.correlation:
        samples = samples / samples.std(dim=1, keepdim=True).clamp_min(1e-12)
    cov = samples @ samples.T / (samples.shape[1] - 1)
    eigenvalues = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0.0)
    total = eigenvalues.sum()
    if total <= 0:
        raise ValueError("latents are constant: the channel covariance is zero")
    p = eigenvalues / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    cumulative = p.cumsum(0)
    return {
        "eigenvalues": eigenvalues.tolist(),
        "explained": p.tolist(),
        "top_k_share": {str(k): float(cumulative[min(k, c) - 1]) for k in cfg.top_k},
        "effective_rank": float(entropy.exp()),
        "participation_ratio": float(total**2 / (eigenvalues**2).sum()),
        "channels": c,
    }


def analyze_latents(latents: torch.Tensor, cfg: SpectralConfig | None = None) -> dict:
    """Frequency spectrum, channel eigenspectrum and latent statistics of one set of latents."""
    return {
        "shape": list(latents.shape),
        "frequency": frequency_spectrum(latents, cfg),
        "eigenspectrum": channel_eigenspectrum(latents, cfg),
        "statistics": latent_statistics(latents),
    }


# --------------------------------------------------------------------------------------------------------- plots
def plot_spectra(results: dict[str, dict], out_dir: str | Path) -> list[Path]:
    """PNG plots overlaying several analyses ``{name: analyze_latents(...)}``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = [
        ("radial_spectrum.png", "spatial frequency (Nyquist = 1)", "mean power",
         lambda r: (r["frequency"]["radial_frequency"], r["frequency"]["radial_profile"]), True),
        ("temporal_spectrum.png", "temporal frequency (Nyquist = 1)", "mean power",
         lambda r: (r["frequency"]["temporal_frequency"], r["frequency"]["temporal_profile"]), True),
        ("eigenspectrum.png", "mode", "share of variance",
         lambda r: (list(range(1, len(r["eigenspectrum"]["explained"]) + 1)), r["eigenspectrum"]["explained"]), True),
    ]
    paths = []
    for filename, xlabel, ylabel, series, log_y in panels:
        fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
        for name, result in results.items():
            xs, ys = series(result)
            points = [(x, y) for x, y in zip(xs, ys) if y is not None and y > 0]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=_label(name, result, filename))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        if filename == "radial_spectrum.png" and results:
            cutoff = next(iter(results.values()))["frequency"]["cutoff"]
            ax.axvline(cutoff, color="gray", linestyle=":", linewidth=1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / filename)
        plt.close(fig)
        paths.append(out_dir / filename)
    return paths


def _label(name: str, result: dict, filename: str) -> str:
    if filename == "eigenspectrum.png":
        return f"{name} (eff. rank {result['eigenspectrum']['effective_rank']:.1f})"
    if filename == "radial_spectrum.png":
        return f"{name} (low-freq x{result['frequency']['low_freq_ratio']:.2f})"
    return name


# ----------------------------------------------------------------------------------------------------------- CLI
def _split(spec: str, option: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise ValueError(f"{option} expects name=value, got {spec!r}")
    return name, value


@torch.no_grad()
def encode_clips(first_stage, video: torch.Tensor, batch_size: int = 2) -> torch.Tensor:
    """Latents of clips (N, 3, T, H, W) in [-1, 1] through a first stage's ``encode``, a few at a time."""
    device = next(first_stage.parameters()).device
    parts = [first_stage.encode(video[i:i + batch_size].to(device)).float().cpu()
             for i in range(0, video.shape[0], batch_size)]
    return torch.cat(parts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Frequency spectrum and channel eigenspectrum of VAE latents.")
    parser.add_argument("--vae", action="append", default=[], metavar="NAME=KIND:PATH",
                        help="a first stage to encode the clips with (kind: ssvae, wan, cogvideox); repeatable")
    parser.add_argument("--latents", action="append", default=[], metavar="NAME=FILE",
                        help="stored latents (safetensors, tensor 'latents' (N, C, T, H, W)); repeatable")
    parser.add_argument("--data", help="video shard folder(s), comma-separated (needed with --vae)")
    parser.add_argument("--num-clips", type=int, default=16)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cutoff", type=float, default=0.25)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", required=True, help="folder for spectral.json and the plots")
    args = parser.parse_args(argv)
    if not args.vae and not args.latents:
        parser.error("give at least one --vae or --latents")
    cfg = SpectralConfig(cutoff=args.cutoff)
    cfg.validate()

    results = {}
    for spec in args.latents:
        from safetensors.torch import load_file

        name, path = _split(spec, "--latents")
        results[name] = analyze_latents(load_file(path)["latents"], cfg)
    if args.vae:
        # Imported here: the library part of this module must not need the VAE stack.
        from infra.data.eval_clips import load_eval_clips
        from vae.first_stage import FirstStageConfig, load_first_stage

        if not args.data:
            parser.error("--vae needs --data")
        clips = load_eval_clips(args.data, args.num_clips, args.frames, args.fps, args.size, args.size)["video"]
        for spec in args.vae:
            name, target = _split(spec, "--vae")
            kind, sep, path = target.partition(":")
            if not sep:
                raise ValueError(f"--vae expects name=kind:path, got {spec!r}")
            first_stage = load_first_stage(FirstStageConfig(kind=kind, path=path, dtype=args.dtype), args.device)
            results[name] = analyze_latents(encode_clips(first_stage, clips, args.batch_size), cfg)
            del first_stage
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spectral.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_spectra(results, out)
    summary = {name: {"low_freq_ratio": r["frequency"]["low_freq_ratio"],
                      "effective_rank": r["eigenspectrum"]["effective_rank"],
                      "top_k_share": r["eigenspectrum"]["top_k_share"]} for name, r in results.items()}
    print(json.dumps(summary, indent=1))
    return results


if __name__ == "__main__":
    main()
