import itertools

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from vae.lcr import LCRConfig, lcr_loss, local_correlation, normalize_channels


def naive_window_corr(z: torch.Tensor, frames: range, tw: int, hw: int = 2, ww: int = 2) -> torch.Tensor:
    """Loop-by-loop reference: mean over windows of the mean pairwise cosine of centred position vectors."""
    b, c, _, h, w = z.shape
    per_window = []
    for bi in range(b):
        for t0 in frames:
            for y0 in range(0, h - h % hw, hw):
                for x0 in range(0, w - w % ww, ww):
                    vecs = [z[bi, :, t, y, x] for t in range(t0, t0 + tw) for y in range(y0, y0 + hw)
                            for x in range(x0, x0 + ww)]
                    vecs = [v - v.mean() for v in vecs]
                    vecs = [v / (v.norm() + 1e-8) for v in vecs]
                    sims = [torch.dot(p, q) for p, q in itertools.combinations(vecs, 2)]
                    per_window.append(torch.stack(sims).mean())
    return torch.stack(per_window).mean()


def test_reproduces_golden_correlations(shared_dir):
    golden = load_file(str(shared_dir / "reference" / "ssvae_golden_tiny.safetensors"))
    z = golden["lcr.latent_mode"]
    assert z.shape == (2, 48, 5, 8, 8)
    corr = local_correlation(z, (2, 2, 2))
    assert corr["image_corr"].item() == pytest.approx(golden["lcr.image_localcorr"].item(), abs=1e-6)
    assert corr["video_corr"].item() == pytest.approx(golden["lcr.video_localcorr"].item(), abs=1e-6)
    assert corr["avg_corr"].item() == pytest.approx(golden["lcr.avg_localcorr"].item(), abs=1e-6)


@pytest.mark.parametrize("shape", [(2, 6, 5, 4, 6), (1, 5, 4, 5, 7)])  # second: F-1, H, W not window multiples
def test_matches_loop_reference_and_crops_partial_windows(shape):
    z = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    corr = local_correlation(z, (2, 2, 2))
    zn = normalize_channels(z)
    f = shape[2]
    image = naive_window_corr(zn, range(0, 1), tw=1)
    video = naive_window_corr(zn, range(1, f - (f - 1) % 2, 2), tw=2)
    torch.testing.assert_close(corr["image_corr"], image)
    torch.testing.assert_close(corr["video_corr"], video)
    torch.testing.assert_close(corr["avg_corr"], (image + video) / 2)


def test_image_and_single_later_frame_have_no_video_term():
    for frames in (1, 2):
        corr = local_correlation(torch.randn(2, 8, frames, 4, 4), (2, 2, 2))
        assert corr["video_corr"] is None
        assert corr["avg_corr"] is corr["image_corr"]


def test_constant_vectors_are_fully_correlated_and_normalisation_is_per_channel():
    base = torch.randn(1, 8, 1, 1, 1)
    z = base.expand(2, 8, 5, 4, 4) + 0.0 * torch.randn(2, 8, 5, 4, 4)
    corr = local_correlation(z, normalize=False)
    assert corr["avg_corr"].item() == pytest.approx(1.0, abs=1e-5)
    # Per-channel affine changes are undone by the normalisation.
    z = torch.randn(2, 8, 5, 4, 4)
    scale, shift = torch.rand(1, 8, 1, 1, 1) * 5 + 0.1, torch.randn(1, 8, 1, 1, 1) * 3
    a, b = local_correlation(z)["avg_corr"], local_correlation(z * scale + shift)["avg_corr"]
    assert a.item() == pytest.approx(b.item(), abs=1e-5)


def test_normalisation_stats_are_detached():
    z = torch.randn(2, 4, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    local_correlation(z)["avg_corr"].backward()
    mean, std = z.mean((0, 2, 3, 4), keepdim=True), z.std((0, 2, 3, 4), keepdim=True)
    z2 = z.detach().clone().requires_grad_(True)
    out = local_correlation((z2 - mean.detach()) / (std.detach() + 1e-6), normalize=False)["avg_corr"]
    out.backward()
    torch.testing.assert_close(z.grad, z2.grad)


def test_rejects_latent_smaller_than_a_window():
    with pytest.raises(ValueError, match="smaller than one"):
        local_correlation(torch.randn(1, 8, 1, 1, 4))
    with pytest.raises(ValueError, match="B, C, F, H, W"):
        local_correlation(torch.randn(8, 4, 4))


class TinyAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Conv3d(3, 6, 1)
        self.dec = nn.Conv3d(6, 3, 1)


def tiny_graph():
    model = TinyAutoencoder().double()
    x = torch.randn(2, 3, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z = model.enc(x)
    nll = (model.dec(z) - x).abs().sum() / x.shape[0]
    return model, z, nll


def test_lcr_term_uses_manual_adaptive_weight():
    model, z, nll = tiny_graph()
    config = LCRConfig(weight=0.02, thresh=0.75)
    avg = local_correlation(z)["avg_corr"]
    assert avg.item() < 0.75
    term, factor = lcr_loss(avg, nll, model.enc.weight, config)

    penalty = 0.75 - avg
    g_nll = torch.autograd.grad(nll, model.enc.weight, retain_graph=True)[0]
    g_lcr = torch.autograd.grad(penalty, model.enc.weight, retain_graph=True)[0]
    expected_factor = (g_nll.norm() / (g_lcr.norm() + 1e-4)).clamp(0, 1e8)
    torch.testing.assert_close(factor, expected_factor)
    torch.testing.assert_close(term, 0.1 * 0.02 * expected_factor * penalty)
    assert not factor.requires_grad
    # The term still backpropagates into the encoder (the graph was retained).
    term.backward()
    assert model.enc.weight.grad is not None and model.enc.weight.grad.abs().sum() > 0


def test_lcr_factor_is_clamped():
    model, z, nll = tiny_graph()
    avg = local_correlation(z)["avg_corr"]
    _, factor = lcr_loss(avg, nll * 1e6, model.enc.weight, LCRConfig(max_adaptive_weight=1e-3))
    assert factor.item() == pytest.approx(1e-3)


def test_lcr_term_is_zero_above_threshold():
    model, z, nll = tiny_graph()
    avg = local_correlation(z)["avg_corr"]
    term, factor = lcr_loss(avg, nll, model.enc.weight, LCRConfig(thresh=avg.item() - 0.01))
    assert term.item() == 0.0 and factor.item() == 0.0


@pytest.mark.parametrize("collective", [False, True])
def test_an_inactive_hinge_runs_the_adaptive_pass_only_where_every_rank_must(collective, monkeypatch):
    """Above the hinge the term is 0 and its factor reported as 0. On one process the factor's autograd pass is
    skipped; under ZeRO-3 on several ranks it runs anyway, so that every rank gathers the same weights (a rank
    skipping it left the other waiting in an all-gather: a 2-rank ZeRO-3 VAE hung at its second step)."""
    import vae.lcr

    calls = []
    monkeypatch.setattr(vae.lcr, "side_passes_are_collective", lambda: collective)
    real = vae.lcr.adaptive_weight
    monkeypatch.setattr(vae.lcr, "adaptive_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, z, nll = tiny_graph()
    avg = local_correlation(z)["avg_corr"]
    term, factor = lcr_loss(avg, nll, model.enc.weight, LCRConfig(thresh=-1.0))
    assert term.item() == 0.0 and factor.item() == 0.0
    assert len(calls) == (1 if collective else 0)
    term.backward()
    assert model.enc.weight.grad is None or model.enc.weight.grad.abs().sum() == 0


def test_lcr_term_errors_when_layer_not_in_graph():
    model, z, nll = tiny_graph()
    avg = local_correlation(z)["avg_corr"]
    unrelated = nn.Conv3d(3, 3, 1).weight
    with pytest.raises(ValueError, match="does not depend"):
        lcr_loss(avg, nll, unrelated, LCRConfig())


@pytest.mark.parametrize("key,value", [("weight", -1.0), ("thresh", 2.0), ("window", [2, 2]),
                                       ("window", [2, 1, 1]), ("max_adaptive_weight", 0.0)])
def test_config_validation_names_key(key, value):
    config = LCRConfig(**{key: value})
    with pytest.raises(ValueError, match=f"lcr.{key}"):
        config.validate()


def test_half_precision_latent_is_measured_in_float32():
    z = torch.randn(2, 8, 5, 4, 4).bfloat16()
    corr = local_correlation(z)
    assert corr["avg_corr"].dtype == torch.float32
    torch.testing.assert_close(corr["avg_corr"], local_correlation(z.float())["avg_corr"])


def test_smoothing_a_latent_raises_its_local_correlation_and_noise_has_none():
    """The manipulation check's instrument on constructed latents: independent noise has no local correlation,
    neighbouring positions made alike (a spatial box blur, then a temporal one) raise the image and video terms."""
    noise = torch.randn(2, 16, 9, 16, 16, generator=torch.Generator().manual_seed(0))
    spatial = torch.nn.functional.avg_pool3d(noise, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    both = torch.nn.functional.avg_pool3d(spatial, (3, 1, 1), stride=1, padding=(1, 0, 0), count_include_pad=False)
    plain, smooth, smoother = (local_correlation(z) for z in (noise, spatial, both))
    assert abs(plain["avg_corr"]) < 0.02
    assert smooth["image_corr"] > 0.4 and smooth["video_corr"] > 0.2
    assert smoother["video_corr"] > smooth["video_corr"] + 0.1
