import pytest
import torch
import torch.nn as nn

from vae.discriminator import DiscriminatorConfig, hinge_generator_loss
from vae.lcr import LCRConfig, local_correlation
from vae.lmr import LMRConfig
from vae.losses import SSVAELoss, SSVAELossConfig
from vae.posterior import DiagonalGaussian

TINY_DISC = DiscriminatorConfig(ndf=4, max_spatial_down=4, max_temporal_down=2)
LATENT = 4


class TinyPerceptual(nn.Module):
    """Stand-in for LPIPS: (N, 3, H, W) x 2 -> (N, 1, 1, 1), with a dropout that must stay off."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(123)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.5))

    def forward(self, a, b):
        return (self.features(a) - self.features(b)).pow(2).mean(dim=(1, 2, 3), keepdim=True)


class TinyAutoencoder(nn.Module):
    """Encoder conv -> moments -> posterior; decoder transposed conv. Space / 2, time kept."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Conv3d(3, 2 * LATENT, (1, 2, 2), stride=(1, 2, 2))
        self.decoder = nn.ConvTranspose3d(LATENT, 3, (1, 2, 2), stride=(1, 2, 2))

    def forward(self, x, sample=True):
        posterior = DiagonalGaussian(self.encoder(x))
        z = posterior.sample(torch.Generator().manual_seed(5)) if sample else posterior.mean
        return self.decoder(z), posterior


def make_loss(**overrides) -> SSVAELoss:
    torch.manual_seed(1)
    config = SSVAELossConfig(**{"discriminator": TINY_DISC, **overrides})
    return SSVAELoss(config, perceptual=TinyPerceptual() if config.perceptual_weight > 0 else None)


def video(frames=3, size=16, seed=0):
    return torch.rand(2, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def grad_norm(loss, weight):
    return torch.autograd.grad(loss, weight, retain_graph=True)[0].norm()


def test_terms_match_hand_computation():
    loss_fn = make_loss(disc_start=0)
    with torch.no_grad():
        loss_fn.logvar.fill_(0.3)
    model = TinyAutoencoder()
    x = video()
    recon, posterior = model(x)
    loss, logs = loss_fn.generator_loss(x, recon, posterior, step=0, encoder_last_layer=model.encoder.weight,
                                        decoder_last_layer=model.decoder.weight, lmr_ratio=0.25)

    b, _, t, h, w = x.shape
    frames = lambda v: v.transpose(1, 2).reshape(b * t, 3, h, w)  # noqa: E731
    p = loss_fn.perceptual(frames(x), frames(recon)).reshape(b, 1, t, 1, 1)
    rec = (x - recon).abs() + p
    s = torch.tensor(0.3)
    nll = (rec / s.exp() + s).sum() / b
    kl = (0.5 * (posterior.mean ** 2 + posterior.var - 1 - posterior.logvar)).sum() / b
    loss_fn.discriminator.eval()  # reuse the spectral-norm vectors of the call above, no new power iteration
    gan = hinge_generator_loss(loss_fn.discriminator(recon))
    gan_factor = (grad_norm(nll, model.decoder.weight) / (grad_norm(gan, model.decoder.weight) + 1e-4)).clamp(0, 1e4)
    corr = local_correlation(posterior.mean, (2, 2, 2))
    penalty = torch.relu(0.75 - corr["avg_corr"])
    lcr_factor = (grad_norm(nll, model.encoder.weight) / (grad_norm(penalty, model.encoder.weight) + 1e-4))
    expected = nll + 5e-4 * kl + 1.0 * gan_factor * gan + 0.1 * 0.02 * lcr_factor.clamp(0, 1e8) * penalty

    torch.testing.assert_close(loss, expected)
    assert logs["loss/nll"] == pytest.approx(nll.item(), rel=1e-5)
    assert logs["loss/rec"] == pytest.approx(rec.mean().item(), rel=1e-5)
    assert logs["loss/perceptual"] == pytest.approx(p.mean().item(), rel=1e-5)
    assert logs["loss/kl"] == pytest.approx(kl.item(), rel=1e-5)
    assert logs["loss/kl_per_element"] == pytest.approx(kl.item() / posterior.mean[0].numel(), rel=1e-5)
    assert logs["scalars/gan_adaptive_weight"] == pytest.approx(gan_factor.item(), rel=1e-4)
    assert logs["scalars/lcr_adaptive_weight"] == pytest.approx(lcr_factor.item(), rel=1e-4)
    assert logs["lcr/video_corr"] == pytest.approx(corr["video_corr"].item(), rel=1e-5)
    assert logs["lmr/mask_ratio"] == 0.25
    assert logs["scalars/logvar"] == pytest.approx(0.3)
    assert all(isinstance(v, float) for v in logs.values())


def test_without_perceptual_and_before_disc_start():
    loss_fn = make_loss(perceptual_weight=0.0, disc_start=100, lcr=LCRConfig(enabled=False), l1_weight=2.0)
    model = TinyAutoencoder()
    x = video()
    recon, posterior = model(x)
    loss, logs = loss_fn.generator_loss(x, recon, posterior, step=99)
    expected = (2.0 * (x - recon).abs()).sum() / 2 + 5e-4 * posterior.kl()
    torch.testing.assert_close(loss, expected)
    assert logs["loss/gan_generator"] == 0.0 and logs["scalars/gan_weight"] == 0.0 and logs["loss/lcr"] == 0.0
    assert "lcr/avg_corr" in logs  # still measured for monitoring


def test_generator_step_leaves_discriminator_without_grads():
    loss_fn = make_loss(disc_start=0)
    model = TinyAutoencoder()
    x = video()
    recon, posterior = model(x)
    loss, _ = loss_fn.generator_loss(x, recon, posterior, 0, model.encoder.weight, model.decoder.weight)
    loss.backward()
    assert all(p.grad is None for p in loss_fn.discriminator_parameters())
    assert all(p.requires_grad for p in loss_fn.discriminator_parameters())
    assert loss_fn.logvar.grad is not None and model.decoder.weight.grad is not None
    assert loss_fn.autoencoder_parameters() == [loss_fn.logvar]


def test_alternation_schedule():
    loss_fn = make_loss(disc_start=3)
    schedule = [loss_fn.is_discriminator_step(s) for s in range(8)]
    assert schedule == [False, False, False, True, False, True, False, True]
    assert [loss_fn.gan_active(s) for s in (2, 3, 4)] == [False, True, True]
    no_gan = make_loss(disc_weight=0.0, disc_start=0)
    assert no_gan.discriminator is None and not any(no_gan.is_discriminator_step(s) for s in range(4))
    with pytest.raises(ValueError, match="disc_weight is 0"):
        no_gan.discriminator_loss(video(), video(seed=1), 5)


def test_clear_errors():
    with pytest.raises(ValueError, match="perceptual_weight"):
        SSVAELoss(SSVAELossConfig(discriminator=TINY_DISC), perceptual=None)
    loss_fn = make_loss(disc_start=0)
    model = TinyAutoencoder()
    x = video()
    recon, posterior = model(x)
    unrelated = nn.Conv3d(1, 1, 1).weight
    with pytest.raises(ValueError, match="GAN generator.*does not depend"):
        loss_fn.generator_loss(x, recon, posterior, 0, model.encoder.weight, unrelated)
    with pytest.raises(ValueError, match="last-layer weight"):
        loss_fn.generator_loss(x, recon, posterior, 0, None, model.decoder.weight)
    with pytest.raises(ValueError, match="one shape"):
        loss_fn.generator_loss(x, recon[:, :, :2], posterior, 0)


def test_eval_mode_needs_no_gradients_and_keeps_perceptual_in_eval():
    loss_fn = make_loss(disc_start=0)
    loss_fn.train()
    assert loss_fn.training and not loss_fn.perceptual.training
    loss_fn.eval()
    model = TinyAutoencoder()
    x = video()
    with torch.no_grad():
        recon, posterior = model(x, sample=False)
        loss, logs = loss_fn.generator_loss(x, recon, posterior, step=0)
    assert logs["scalars/gan_adaptive_weight"] == 1.0 and logs["scalars/lcr_adaptive_weight"] == 1.0
    assert torch.isfinite(loss)
    z = torch.randn(1, LATENT, 3, 16, 16)
    assert loss_fn.apply_lmr(z, torch.zeros(1, LATENT, 1, 1, 1), resolution=256)[0] is z  # eval never masks


def test_discriminator_loss_goes_down_on_fixed_fakes():
    loss_fn = make_loss(disc_start=0)
    real, fake = video(seed=1), video(seed=2).mul(0.3)
    optimizer = torch.optim.Adam(loss_fn.discriminator_parameters(), lr=2e-3)
    values = []
    for step in range(12):
        loss, logs = loss_fn.discriminator_loss(real, fake.requires_grad_(True), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values.append(logs["loss/disc"])
    assert fake.grad is None  # reconstructions are detached on the discriminator's step
    assert set(logs) == {"loss/disc", "logits/real_image", "logits/fake_image", "logits/real_video",
                         "logits/fake_video"}
    assert values[-1] < 0.8 * values[0]
    before, logs = loss_fn.discriminator_loss(real, fake, step=-1)
    assert before.item() == 0.0


def test_tiny_autoencoder_training_lowers_the_loss():
    # Mask often to exercise LMR (16x16 frames).
    lmr = LMRConfig(mask_probs={16: [0.4, 0.2, 0.2, 0.2]}, block_sizes={16: [1, 1, 1]})
    loss_fn = make_loss(disc_start=6, lmr=lmr)
    model = TinyAutoencoder()
    mask_token = nn.Parameter(torch.randn(1, LATENT, 1, 1, 1))
    ae_opt = torch.optim.Adam([*model.parameters(), mask_token, *loss_fn.autoencoder_parameters()], lr=2e-2)
    disc_opt = torch.optim.Adam(loss_fn.discriminator_parameters(), lr=1e-3)
    # Smooth content (nearly constant 2x2 patches), so the 4-channel latent can represent it.
    x = torch.nn.functional.interpolate(video(frames=3, size=4, seed=3), size=(3, 16, 16), mode="trilinear")
    generator = torch.Generator().manual_seed(0)
    l1 = []
    for step in range(40):
        posterior = DiagonalGaussian(model.encoder(x))
        z, ratio = loss_fn.apply_lmr(posterior.sample(generator), mask_token, x.shape[3], generator)
        recon = model.decoder(z)
        if loss_fn.is_discriminator_step(step):
            loss, _ = loss_fn.discriminator_loss(x, recon, step)
            disc_opt.zero_grad()
            loss.backward()
            disc_opt.step()
            continue
        loss, logs = loss_fn.generator_loss(x, recon, posterior, step, model.encoder.weight, model.decoder.weight,
                                            lmr_ratio=ratio)
        ae_opt.zero_grad()
        loss.backward()
        ae_opt.step()
        l1.append((logs["loss/l1"], logs["loss/nll"]))
    first, last = torch.tensor(l1[:4]).mean(0), torch.tensor(l1[-4:]).mean(0)  # smooth over LMR draws
    assert last[0] < 0.8 * first[0]  # L1
    assert last[1] < 0.7 * first[1]  # NLL


@pytest.mark.parametrize("kwargs,key", [({"kl_weight": -1.0}, "loss.kl_weight"),
                                        ({"disc_start": -1}, "loss.disc_start"),
                                        ({"lcr": LCRConfig(thresh=3.0)}, "loss.lcr.thresh"),
                                        ({"discriminator": DiscriminatorConfig(ndf=0)}, "loss.discriminator.ndf"),
                                        ({"l1_weight": 0.0, "perceptual_weight": 0.0}, "loss.l1_weight")])
def test_config_validation_names_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        SSVAELossConfig(**kwargs).validate()


def test_works_with_the_ssvae_model():
    """Wiring with the real model: its posterior, mask token and last-layer properties (tiny config, 32x32)."""
    from vae.config import DecoderConfig, EncoderConfig, SSVAEConfig
    from vae.model import SSVAE

    common = dict(ch=4, ch_mult=(2, 4, 8, 16, 16), num_res_blocks=1, num_mid_blocks=1, z_channels=8)
    torch.manual_seed(0)
    model = SSVAE(SSVAEConfig(encoder=EncoderConfig(**common), decoder=DecoderConfig(**common)))
    lmr = LMRConfig(mask_probs={32: [0.0, 0.0, 0.0, 1.0]}, block_sizes={32: [1, 1, 1]})
    loss_fn = make_loss(perceptual_weight=0.0, disc_start=0, lmr=lmr,
                        discriminator=DiscriminatorConfig(ndf=2, max_spatial_down=4, max_temporal_down=4))
    x = video(frames=5, size=32)
    posterior = model.posterior(x)
    z, ratio = loss_fn.apply_lmr(posterior.sample(), model.mask_token, x.shape[3], torch.Generator().manual_seed(0))
    loss, logs = loss_fn.generator_loss(x, model.decoder(z), posterior, 1, model.encoder_last_layer,
                                        model.decoder_last_layer, lmr_ratio=ratio)
    loss.backward()
    assert ratio == 0.75 and model.mask_token.grad.abs().sum() > 0
    assert logs["scalars/lcr_adaptive_weight"] > 0 and logs["scalars/gan_adaptive_weight"] > 0
    assert torch.isfinite(loss)


def test_bfloat16_model_gives_float32_loss():
    loss_fn = make_loss(disc_start=0, perceptual_weight=0.0)  # fp32 discriminator judging bf16 reconstructions
    model = TinyAutoencoder().bfloat16()
    x = video().bfloat16()
    recon, posterior = model(x)
    loss, logs = loss_fn.generator_loss(x, recon, posterior, 0, model.encoder.weight, model.decoder.weight)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    expected_nll = (x.float() - recon.float()).abs().sum() / 2
    assert logs["loss/nll"] == pytest.approx(expected_nll.item(), rel=1e-5)
    loss.backward()
    assert model.decoder.weight.grad.dtype == torch.bfloat16
