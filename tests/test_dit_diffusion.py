"""v-prediction diffusion: the schedule equals diffusers' CogVideoXDDIMScheduler, the forward process and
loss are consistent, the loss trains, caption dropout."""

import pytest
import torch

from dit import CogVideoXTransformer, DiTConfig, DiffusionConfig, VPrediction, alphas_cumprod, drop_text, training_loss

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("model", ["cogvideox-2b", "cogvideox-5b"])
def test_alphas_cumprod_equal_diffusers(model):
    config = DiffusionConfig.for_model(model)
    ref = diffusers.CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=config.snr_shift_scale,
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True,
    )
    ours = alphas_cumprod(config)
    torch.testing.assert_close(ours, ref.alphas_cumprod.to(ours.dtype), atol=1e-12, rtol=0)
    assert ours[-1] == 0  # zero terminal SNR
    assert torch.all(ours[1:] < ours[:-1])


def test_snr_shift_lowers_snr():
    shifted, plain = alphas_cumprod(DiffusionConfig(snr_shift_scale=3.0)), alphas_cumprod(DiffusionConfig(snr_shift_scale=1.0))
    snr = lambda a: a[:-1] / (1 - a[:-1])  # noqa: E731
    # Before the zero-SNR rescale the shift divides the SNR by exactly 3.
    raw3 = alphas_cumprod(DiffusionConfig(snr_shift_scale=3.0, rescale_zero_terminal_snr=False))
    raw1 = alphas_cumprod(DiffusionConfig(snr_shift_scale=1.0, rescale_zero_terminal_snr=False))
    torch.testing.assert_close(snr(raw3), snr(raw1) / 3)
    assert torch.all(snr(shifted)[1:] < snr(plain)[1:])


def test_forward_process_and_velocity_are_consistent():
    vp = VPrediction()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 2, 5, 5, generator=g), torch.randn(4, 3, 2, 5, 5, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    xt = vp.add_noise(x0, noise, t)
    v = vp.velocity(x0, noise, t)
    torch.testing.assert_close(vp.predict_x0(xt, v, t), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(xt[3], noise[3])  # zero SNR at the last step: pure noise
    torch.testing.assert_close(v[3], -x0[3])


def test_loss_is_mse_on_v_for_the_drawn_noise():
    vp = VPrediction()
    x0 = torch.randn(2, 3, 4, 4, 4)
    t, noise = torch.tensor([3, 700]), torch.randn(2, 3, 4, 4, 4)
    oracle = lambda xt, text, timestep: vp.velocity(x0, noise, timestep)  # noqa: E731
    assert vp.training_loss(oracle, x0, None, timesteps=t, noise=noise) == 0
    zero = lambda xt, text, timestep: torch.zeros_like(xt)  # noqa: E731
    expected = vp.velocity(x0, noise, t).square().mean()
    torch.testing.assert_close(vp.training_loss(zero, x0, None, timesteps=t, noise=noise), expected)


def test_loss_is_deterministic_given_generator_and_passes_mask():
    seen = {}

    def model(xt, text, timestep, text_mask=None):
        seen["mask"] = text_mask
        return xt * 0.5

    x0 = torch.randn(2, 3, 4, 4, 4)
    losses = [training_loss(model, x0, torch.zeros(2, 5, 7), generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert losses[0] == losses[1]
    mask = torch.ones(2, 5, dtype=torch.bool)
    training_loss(model, x0, torch.zeros(2, 5, 7), text_mask=mask)
    assert seen["mask"] is mask


def test_tiny_transformer_loss_goes_down():
    torch.manual_seed(0)
    model = CogVideoXTransformer(DiTConfig.preset("tiny", patch_size=1))
    vp = VPrediction(DiffusionConfig.for_model("cogvideox-5b"))
    latents = torch.randn(2, 2, 16, 4, 4)
    text = torch.randn(2, 8, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)

    def loss_on_fixed_draws():
        with torch.no_grad():
            return vp.training_loss(model, latents, text, generator=torch.Generator().manual_seed(123)).item()

    before = loss_on_fixed_draws()
    for _ in range(30):
        opt.zero_grad()
        vp.training_loss(model, latents, text, generator=g).backward()
        opt.step()
    assert loss_on_fixed_draws() < 0.8 * before


def test_drop_text_zeroes_whole_rows_at_rate_p():
    emb = torch.randn(1000, 3, 4) + 5
    dropped = drop_text(emb, 0.1, torch.Generator().manual_seed(0))
    zero_rows = (dropped == 0).all(dim=(1, 2))
    kept_rows = (dropped == emb).all(dim=(1, 2))
    assert torch.all(zero_rows | kept_rows)
    assert 60 < zero_rows.sum() < 140
    assert torch.equal(drop_text(emb, 0.0), emb)
    assert not drop_text(emb, 1.0).any()
    with pytest.raises(ValueError, match="p"):
        drop_text(emb, 1.5)


def test_bad_diffusion_config_raises():
    with pytest.raises(ValueError, match="snr_shift_scale"):
        DiffusionConfig(snr_shift_scale=0).validate()
    with pytest.raises(ValueError, match="beta_start"):
        DiffusionConfig(beta_start=0.02).validate()
    with pytest.raises(ValueError, match="unknown model"):
        DiffusionConfig.for_model("sd3")
