import json

import pytest
import torch
import torch.nn.functional as F

from tools.latent_stats import LatentMoments, latent_statistics
from tools.spectral import (
    SpectralConfig, analyze_latents, channel_eigenspectrum, frequency_spectrum, main, plot_spectra, power_spectrum,
)


def white(n=4, c=16, t=5, h=32, w=32, seed=0):
    return torch.randn(n, c, t, h, w, generator=torch.Generator().manual_seed(seed))


def smooth(x, passes=2):
    """Spatial low-pass: repeated 3x3 box blur (circular, so no edge effects) on every frame."""
    n, c, t, h, w = x.shape
    y = x.reshape(n * c * t, 1, h, w)
    kernel = torch.ones(1, 1, 3, 3, dtype=x.dtype) / 9
    for _ in range(passes):
        y = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="circular"), kernel)
    return y.reshape(n, c, t, h, w)


def test_white_noise_has_a_flat_spectrum():
    result = frequency_spectrum(white())
    radial = torch.tensor(result["radial_profile"])
    assert torch.allclose(radial[1:], torch.ones_like(radial[1:]), atol=0.15)
    # The first bin is the DC alone, whose power is the spread of sample means around the global mean: 1 - 1/N.
    assert radial[0] == pytest.approx(0.75, abs=0.15)
    assert torch.allclose(torch.tensor(result["temporal_profile"]), torch.ones(3), atol=0.1)
    assert result["low_freq_ratio"] == pytest.approx(1.0, abs=0.15)
    # On a 32x32 grid, bins with radius < 0.25 (|k| < 4): 45 of 1024.
    assert result["low_freq_share_flat"] == pytest.approx(45 / 1024)
    assert result["temporal_low_freq_share_flat"] == pytest.approx(1 / 5)  # only the DC of 5 frames


def test_power_spectrum_obeys_parseval_and_ignores_channel_scale():
    x = white(n=2, c=3, t=3, h=8, w=8).double()
    scaled = x * torch.tensor([1.0, 10.0, 0.01]).view(1, 3, 1, 1, 1) + 5.0
    power = power_spectrum(x)
    assert power.mean().item() == pytest.approx(1.0, abs=1e-6)  # unit variance after standardisation
    assert torch.allclose(power_spectrum(scaled), power, atol=1e-9)


def test_smoothed_noise_is_biased_to_low_frequencies():
    x = white()
    plain, blurred = frequency_spectrum(x), frequency_spectrum(smooth(x))
    assert blurred["low_freq_share"] > 4 * plain["low_freq_share"]
    assert blurred["low_freq_ratio"] > 4
    radial = [p for p in blurred["radial_profile"]]
    assert radial[0] > 10 * radial[-1]  # power falls with frequency
    # Temporal smoothing shows in the temporal share, spatial smoothing does not.
    assert blurred["temporal_low_freq_ratio"] == pytest.approx(1.0, abs=0.15)
    slow = x.cumsum(dim=2)  # random walk in time: red temporal spectrum
    assert frequency_spectrum(slow)["temporal_low_freq_ratio"] > 2


def test_white_noise_has_full_effective_rank():
    result = channel_eigenspectrum(white())
    assert result["effective_rank"] > 0.97 * 16
    assert result["participation_ratio"] > 0.9 * 16
    assert result["top_k_share"]["1"] < 0.1
    assert result["top_k_share"]["16"] == pytest.approx(1.0)
    assert sum(result["explained"]) == pytest.approx(1.0)


def test_copied_channels_put_all_variance_in_one_mode():
    signal = white(c=1)
    x = signal.repeat(1, 8, 1, 1, 1) * torch.linspace(0.5, 2.0, 8).view(1, 8, 1, 1, 1)
    result = channel_eigenspectrum(x)
    assert result["top_k_share"]["1"] == pytest.approx(1.0, abs=1e-9)
    assert result["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    # Two independent signals spread over 8 channels: two modes.
    two = torch.cat([white(c=1, seed=1).repeat(1, 4, 1, 1, 1), white(c=1, seed=2).repeat(1, 4, 1, 1, 1)], dim=1)
    two_modes = channel_eigenspectrum(two)
    assert two_modes["effective_rank"] == pytest.approx(2.0, abs=0.05)
    assert two_modes["top_k_share"]["4"] == pytest.approx(1.0, abs=1e-9)  # k beyond the rank


def test_correlation_option_removes_channel_scale():
    x = white(c=4) * torch.tensor([1.0, 1.0, 1.0, 100.0]).view(1, 4, 1, 1, 1)
    assert channel_eigenspectrum(x)["effective_rank"] < 1.2
    assert channel_eigenspectrum(x, SpectralConfig(correlation=True))["effective_rank"] > 3.8


def test_latent_statistics_and_streaming_agree():
    x = white(c=3) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1, 1) + torch.tensor([0.0, 1.0, -1.0]).view(
        1, 3, 1, 1, 1)
    stats = latent_statistics(x)
    assert stats["mean"] == pytest.approx([0.0, 1.0, -1.0], abs=0.05)
    assert stats["std"] == pytest.approx([1.0, 2.0, 0.5], rel=0.03)
    assert max(abs(k) for k in stats["kurtosis"]) < 0.2  # Gaussian
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((4, 1, 5, 32, 32))
    assert latent_statistics(laplace)["kurtosis"][0] == pytest.approx(3.0, abs=0.6)
    streamed = LatentMoments().update(x[:2]).update(x[2:]).result()
    for key in ("mean", "std", "kurtosis", "min", "max"):
        assert streamed[key] == pytest.approx(stats[key], abs=1e-9)
    with pytest.raises(ValueError, match="channels"):
        LatentMoments().update(x).update(white(c=2))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"\(N, C, T, H, W\)"):
        frequency_spectrum(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        channel_eigenspectrum(torch.full((1, 2, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="cutoff"):
        frequency_spectrum(white(), SpectralConfig(cutoff=0.0))
    with pytest.raises(ValueError, match="top_k"):
        SpectralConfig(top_k=[0]).validate()


def test_plots_overlay_several_results(tmp_path):
    x = white(n=2, c=8, h=16, w=16)
    results = {"white": analyze_latents(x), "smooth": analyze_latents(smooth(x))}
    paths = plot_spectra(results, tmp_path)
    assert sorted(p.name for p in paths) == ["eigenspectrum.png", "radial_spectrum.png", "temporal_spectrum.png"]
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    json.dumps(results)  # the result is JSON-able as is


def test_cli_on_stored_latents_and_a_tiny_vae(tmp_path):
    from safetensors.torch import save_file

    from tools.make_default_data import make_default_data
    from vae.config import DecoderConfig, EncoderConfig, SSVAEConfig
    from vae.model import SSVAE

    save_file({"latents": smooth(white(n=2, c=8, h=16, w=16)).float()}, str(tmp_path / "smooth.safetensors"))
    torch.manual_seed(0)
    common = dict(ch=4, ch_mult=(2, 4, 8, 16, 16), num_res_blocks=1, num_mid_blocks=2, z_channels=8)
    SSVAE(SSVAEConfig(encoder=EncoderConfig(**common), decoder=DecoderConfig(**common))).save_pretrained(
        tmp_path / "vae")
    make_default_data(tmp_path / "data", num_videos=2, num_images=0, size=32, frames=5, fps=8, show_progress=False)
    out = tmp_path / "report"
    results = main(["--latents", f"smooth={tmp_path / 'smooth.safetensors'}", "--vae", f"tiny=ssvae:{tmp_path / 'vae'}",
                    "--data", str(tmp_path / "data"), "--num-clips", "2", "--frames", "5", "--size", "32",
                    "--out", str(out)])
    assert set(results) == {"smooth", "tiny"}
    assert results["tiny"]["shape"] == [2, 8, 2, 2, 2]
    assert results["smooth"]["frequency"]["low_freq_ratio"] > 2
    saved = json.loads((out / "spectral.json").read_text())
    assert saved["tiny"]["eigenspectrum"]["channels"] == 8
    assert (out / "eigenspectrum.png").is_file()
