"""Samplers: an oracle v recovers a known x0, determinism, guidance arithmetic and the dynamic ramp."""

import math

import pytest
import torch

from dit import CogVideoXTransformer, DiTConfig, DiffusionConfig, VPrediction, dynamic_guidance_scale, sample

pytest.importorskip("diffusers")

SHAPE = (2, 3, 4, 4, 4)


class Oracle:
    """A "model" that returns the exact v of x_t for a fixed clean target, optionally text-dependent:
    target + text offset, so guidance has something to act on."""

    def __init__(self, target: torch.Tensor, diffusion: DiffusionConfig | None = None):
        self.target = target
        self.vp = VPrediction(diffusion)
        self.calls = []

    def __call__(self, xt, text, timestep):
        self.calls.append(xt.shape[0])
        x0 = self.target.repeat(xt.shape[0] // self.target.shape[0], *[1] * (xt.ndim - 1))
        x0 = x0 + text.mean(dim=(1, 2)).reshape(-1, *[1] * (xt.ndim - 1))
        a = self.vp.alphas_cumprod[timestep.long()].float().reshape(-1, *[1] * (xt.ndim - 1))
        # v such that sqrt(a) x_t - sqrt(1 - a) v = x0
        return (a.sqrt() * xt - x0) / (1 - a).sqrt()


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
@pytest.mark.parametrize("model", ["cogvideox-2b", "cogvideox-5b"])
def test_oracle_velocity_recovers_x0(sampler, model):
    target = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    diffusion = DiffusionConfig.for_model(model)
    text = torch.zeros(2, 5, 7)
    out = sample(Oracle(target, diffusion), text, shape=SHAPE, steps=10, guidance=1.0, sampler=sampler,
                 generator=torch.Generator().manual_seed(1), diffusion=diffusion)
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)


def test_guidance_extrapolates_from_unconditional():
    # Oracle x0 = target + mean(text): cond text mean 1, neg text mean 0 -> guided x0 = target + g.
    target = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    oracle = Oracle(target)
    out = sample(oracle, torch.ones(2, 5, 7), torch.zeros(2, 5, 7), shape=SHAPE, steps=8, guidance=4.0,
                 generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, target + 4.0, atol=1e-4, rtol=0)
    assert oracle.calls == [4] * 8  # one batched call per step: [uncond, cond]


def test_guidance_one_is_the_conditional_path():
    torch.manual_seed(0)
    model = CogVideoXTransformer(DiTConfig.preset("tiny")).eval()
    text, neg = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    kwargs = dict(shape=(2, 2, 16, 4, 4), steps=4, sampler="ddim")
    cond_only = sample(model, text, None, guidance=1.0, generator=torch.Generator().manual_seed(5), **kwargs)
    with_neg = sample(model, text, neg, guidance=1.0, generator=torch.Generator().manual_seed(5), **kwargs)
    # Force the two-branch path: guidance 1 + 1e-12 is 1 up to rounding.
    two_branch = sample(model, text, neg, guidance=1.0 + 1e-12, generator=torch.Generator().manual_seed(5), **kwargs)
    torch.testing.assert_close(cond_only, with_neg)
    torch.testing.assert_close(two_branch, cond_only, atol=1e-5, rtol=1e-5)
    guided = sample(model, text, neg, guidance=6.0, generator=torch.Generator().manual_seed(5), **kwargs)
    assert (guided - cond_only).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_deterministic_given_seed(sampler):
    torch.manual_seed(0)
    model = CogVideoXTransformer(DiTConfig.preset("tiny-sincos")).eval()
    text = torch.randn(1, 8, 32)
    kwargs = dict(shape=(1, 2, 16, 4, 4), steps=3, guidance=5.0, dynamic_cfg=True, sampler=sampler)
    a = sample(model, text, generator=torch.Generator().manual_seed(11), **kwargs)
    b = sample(model, text, generator=torch.Generator().manual_seed(11), **kwargs)
    c = sample(model, text, generator=torch.Generator().manual_seed(12), **kwargs)
    assert a.shape == (1, 2, 16, 4, 4) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_dynamic_guidance_ramps_from_one_to_one_plus_g():
    g, n = 6.0, 50
    scales = [dynamic_guidance_scale(g, i, n) for i in range(n)]
    assert scales[0] == 1.0
    assert all(b >= a for a, b in zip(scales, scales[1:]))
    assert scales[n // 2] == pytest.approx(1 + g * (1 - math.cos(math.pi * 0.5**5)) / 2)
    assert dynamic_guidance_scale(g, n, n) == pytest.approx(1 + g)


def test_dynamic_cfg_uses_the_ramp():
    # With the ramp, the first step has guidance 1 (x0 estimate = cond); the guided oracle's final x0 is
    # target + the last step's scale.
    target = torch.zeros(SHAPE)
    out = sample(Oracle(target), torch.ones(2, 5, 7), torch.zeros(2, 5, 7), shape=SHAPE, steps=5, guidance=4.0,
                 dynamic_cfg=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, torch.full(SHAPE, dynamic_guidance_scale(4.0, 4, 5)), atol=1e-4, rtol=0)


def test_bad_arguments_raise():
    oracle = Oracle(torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="sampler"):
        sample(oracle, torch.zeros(2, 5, 7), shape=SHAPE, sampler="euler")
    with pytest.raises(ValueError, match="shape"):
        sample(oracle, torch.zeros(2, 5, 7))
    with pytest.raises(ValueError, match="batch"):
        sample(oracle, torch.zeros(3, 5, 7), shape=SHAPE)
