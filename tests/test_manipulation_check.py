"""The manipulation check's numbers on constructed latents, its paired intervals, its expectations and its errors."""
import pytest
import torch
import torch.nn.functional as F

from tools.manipulation_check import ClipMoments, expectations, manipulation_check, markdown


def _noise(n=12, c=16, t=3, h=8, w=8, seed=0):
    return torch.randn(n, c, t, h, w, generator=torch.Generator().manual_seed(seed))


def _spatially_smoothed(x):
    """3x3 circular box filter per frame: neighbouring latent vectors become alike."""
    return F.avg_pool3d(F.pad(x, (1, 1, 1, 1, 0, 0), mode="circular"), (1, 3, 3), stride=1)


def test_white_noise_is_flat_and_uncorrelated():
    numbers = ClipMoments.of(_noise()).numbers()
    assert numbers["lcr"] == pytest.approx(0.0, abs=0.02)
    assert numbers["low_freq_ratio"] == pytest.approx(1.0, abs=0.1)
    assert numbers["temporal_low_freq_ratio"] == pytest.approx(1.0, abs=0.1)
    assert numbers["effective_rank"] > 15  # 16 isotropic channels
    assert numbers["top_k_share"] == pytest.approx(4 / 16, abs=0.03)


def test_spatial_smoothing_raises_local_correlation_and_low_frequency_ratio():
    x = _noise()
    check = manipulation_check({"base": ClipMoments.of(x), "smooth": ClipMoments.of(_spatially_smoothed(x))},
                               "base", resamples=300)
    smooth = check["vaes"]["smooth"]
    assert smooth["lcr"]["value"] > 0.3 and smooth["lcr"]["difference"]["direction"] == 1
    assert smooth["low_freq_ratio"]["value"] > 2 and smooth["low_freq_ratio"]["difference"]["direction"] == 1
    # Smoothing in space leaves time alone.
    assert smooth["temporal_low_freq_ratio"]["difference"]["direction"] == 0


def test_constant_in_time_raises_only_the_temporal_ratio():
    x = _noise()
    still = x[:, :, :1].expand_as(x).contiguous()
    numbers = ClipMoments.of(still).numbers()
    assert numbers["temporal_low_freq_ratio"] > 2.5  # all power at ft = 0, one of 3 temporal bins
    assert numbers["low_freq_ratio"] == pytest.approx(1.0, abs=0.2)


def test_rank_one_latent_has_top_one_share_of_one():
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(1, 16, 1, 1, 1, generator=g)
    rank1 = torch.randn(12, 1, 3, 8, 8, generator=g) * direction
    moments = ClipMoments.of(rank1, top_k=1)
    numbers = moments.numbers()
    assert numbers["top_k_share"] == pytest.approx(1.0, abs=1e-9)
    assert numbers["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    check = manipulation_check({"base": ClipMoments.of(_noise(), top_k=1), "rank1": moments}, "base", resamples=200)
    assert check["vaes"]["rank1"]["top_k_share"]["difference"]["direction"] == 1
    assert check["vaes"]["rank1"]["effective_rank"]["difference"]["direction"] == -1


def test_intervals_cover_the_estimate_and_shrink_with_clips():
    few = manipulation_check({"a": ClipMoments.of(_noise(n=6) + _spatially_smoothed(_noise(n=6, seed=2)))}, "a",
                             resamples=400)["vaes"]["a"]["lcr"]
    many = manipulation_check({"a": ClipMoments.of(_noise(n=48) + _spatially_smoothed(_noise(n=48, seed=2)))}, "a",
                              resamples=400)["vaes"]["a"]["lcr"]
    for cell in (few, many):
        assert cell["interval"][0] <= cell["value"] <= cell["interval"][1]
    assert many["interval"][1] - many["interval"][0] < few["interval"][1] - few["interval"][0]


def test_same_latents_do_not_differ():
    moments = ClipMoments.of(_noise())
    check = manipulation_check({"base": moments, "copy": moments}, "base", resamples=200)
    for cell in check["vaes"]["copy"].values():
        assert cell["difference"]["value"] == 0 and cell["difference"]["direction"] == 0


def test_expectations_and_table():
    x = _noise()
    check = manipulation_check({"base": ClipMoments.of(x), "lcr": ClipMoments.of(_spatially_smoothed(x)),
                                "lmr": ClipMoments.of(x)}, "base", resamples=200)
    result = {(c["vae"], c["claim"]): c["passed"]
              for c in expectations(check, {"lcr": {"lcr": True}, "lmr": {"lmr": True}}, [0.75])}
    assert result[("base", "the baseline's LCR statistic is below the hinge 0.75 (so LCR acts)")]
    assert result[("lcr", "LCR raises local correlation")] and result[("lcr", "LCR raises the low-frequency ratio")]
    assert not result[("lmr", "LMR raises the top-4 share")]  # identical latents: nothing raised
    # A hinge the baseline already clears fails the first expectation; without LCR VAEs there is no hinge line.
    assert not expectations(check, {}, [-0.5])[0]["passed"]
    assert not [c for c in expectations(check, {"lmr": {"lmr": True}}, []) if "hinge" in c["claim"]]
    two = [c["claim"] for c in expectations(check, {}, [0.8, 0.9])]
    assert two == ["the baseline's LCR statistic is below the hinge 0.8 (so LCR acts)",
                   "the baseline's LCR statistic is below the hinge 0.9 (so LCR acts)"]
    table = markdown(check, expectations(check, {"lmr": {"lmr": True}}, [0.75]))
    assert "| lmr |" in table and "**no**" in table and "top-4 share" in table
    assert "Not as the paper predicts in this run: LMR raises the top-4 share, for lmr." in table
    # Every expectation met: no such sentence.
    assert "Not as the paper predicts" not in markdown(check, expectations(check, {"lcr": {"lcr": True}}, [0.75]))


def test_bad_inputs_name_the_problem():
    x = _noise()
    with pytest.raises(ValueError, match="at least 2 clips"):
        ClipMoments.of(x[:1])
    with pytest.raises(ValueError, match="top_k"):
        ClipMoments.of(x, top_k=17)
    with pytest.raises(ValueError, match=r"\(N, C, T, H, W\)"):
        ClipMoments.of(x[0])
    with pytest.raises(ValueError, match="NaN"):
        ClipMoments.of(torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="cutoff 0.25 keeps only the zero-frequency bin of a 4x4 latent"):
        ClipMoments.of(_noise(h=4, w=4), cutoff=0.25)
    with pytest.raises(ValueError, match="same clips"):
        manipulation_check({"a": ClipMoments.of(x), "b": ClipMoments.of(x[:6])}, "a")
    with pytest.raises(ValueError, match="baseline 'z'"):
        manipulation_check({"a": ClipMoments.of(x)}, "z")
