"""SSVAE model behaviour on a tiny config with the released compression (16x space, 4x time)."""

import pytest
import torch

from vae.config import DecoderConfig, EncoderConfig, SSVAEConfig
from vae.model import SSVAE
from vae.posterior import DiagonalGaussian


def tiny_config(**kw) -> SSVAEConfig:
    common = dict(ch=4, ch_mult=(2, 4, 8, 16, 16), num_res_blocks=1, num_mid_blocks=2, z_channels=8)
    return SSVAEConfig(encoder=EncoderConfig(**common), decoder=DecoderConfig(**common), **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = SSVAE(tiny_config()).eval()
    # Non-zero attention projections so the attention path is exercised.
    for p in m.parameters():
        if p.ndim == 4 and p.shape[-1] == 1:
            torch.nn.init.normal_(p, std=0.05)
    return m


def test_shapes_video_and_image(model):
    x = torch.rand(2, 3, 9, 32, 48) * 2 - 1
    with torch.no_grad():
        moments = model.encode_moments(x)
        assert moments.shape == (2, 16, 3, 2, 3)
        assert model.decode(model.encode(x)).shape == x.shape
        image = x[:, :, :1]
        assert model.encode(image).shape == (2, 8, 1, 2, 3)
        assert model.decode(model.encode(image)).shape == image.shape


def test_encoder_is_causal_in_time(model):
    torch.manual_seed(1)
    x = torch.randn(1, 3, 9, 32, 32)
    with torch.no_grad():
        short = model.encode_moments(x[:, :, :5])
        long = model.encode_moments(x)
        image = model.encode_moments(x[:, :, :1])
    torch.testing.assert_close(long[:, :, :2], short, atol=1e-5, rtol=0)
    torch.testing.assert_close(long[:, :, :1], image, atol=1e-5, rtol=0)


def test_decoder_is_causal_in_time(model):
    torch.manual_seed(2)
    z = torch.randn(1, 8, 3, 2, 2)
    with torch.no_grad():
        long = model.decoder(z)
        short = model.decoder(z[:, :, :2])
    assert long.shape[2] == 9 and short.shape[2] == 5
    torch.testing.assert_close(long[:, :, :5], short, atol=1e-5, rtol=0)


def test_future_frames_change_later_latents(model):
    x = torch.randn(1, 3, 5, 32, 32)
    y = x.clone()
    y[:, :, 4] += 1.0
    with torch.no_grad():
        a, b = model.encode_moments(x), model.encode_moments(y)
    assert torch.equal(a[:, :, 0], b[:, :, 0])
    assert (a[:, :, 1] - b[:, :, 1]).abs().max() > 1e-4


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 3, 4, 32, 32), "frame count"),
        ((1, 3, 5, 24, 32), "multiples of 16"),
        ((1, 4, 5, 32, 32), "3 channels"),
        ((3, 5, 32, 32), r"\(B, C, T, H, W\)"),
    ],
)
def test_bad_video_input_raises(model, shape, message):
    with pytest.raises(ValueError, match=message):
        model.encode(torch.zeros(shape))


def test_bad_latent_input_raises(model):
    with pytest.raises(ValueError, match="8 channels"):
        model.decode(torch.zeros(1, 4, 1, 2, 2))


def test_posterior_kl_sample_and_clamp():
    moments = torch.zeros(2, 4, 1, 1, 3)
    moments[:, :2] = 1.0  # mean 1, logvar 0 -> KL = 0.5 * mean^2 per element
    moments[1, 2:] = 50.0  # clamped to 20
    post = DiagonalGaussian(moments)
    assert post.logvar.max() == 20.0
    kl0 = 0.5 * 6 * 1.0
    kl1 = 0.5 * 6 * (1 + torch.exp(torch.tensor(20.0)) - 1 - 20)
    torch.testing.assert_close(post.kl(), (kl0 + kl1) / 2)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(post.sample(g1), post.sample(g2))
    assert torch.equal(post.mode(), post.mean)


def test_latent_normalisation_and_mask_token(model):
    assert model.mask_token.shape == (1, 8, 1, 1, 1) and model.mask_token.requires_grad
    x = torch.randn(1, 3, 1, 16, 16)
    with torch.no_grad():
        raw = model.posterior(x).mean
        model.set_latent_stats(torch.arange(8.0), torch.full((8,), 2.0))
        try:
            torch.testing.assert_close(model.encode(x), (raw - torch.arange(8.0).view(1, 8, 1, 1, 1)) / 2)
            torch.testing.assert_close(model.decode(model.encode(x)), model.decoder(raw), atol=1e-5, rtol=0)
        finally:
            model.set_latent_stats(torch.zeros(8), torch.ones(8))
    with pytest.raises(ValueError, match="8 values"):
        model.set_latent_stats([0.0], [1.0])


def test_last_layers_and_gradients_flow():
    torch.manual_seed(0)
    model = SSVAE(tiny_config())
    x = torch.randn(1, 3, 5, 16, 16)
    rec, post = model(x)
    (rec.abs().mean() + post.kl()).backward()
    assert model.encoder_last_layer.shape == (16, 64, 3, 3, 3)
    assert model.decoder_last_layer.shape == (3, 8, 3, 3, 3)
    assert model.encoder_last_layer.grad.abs().sum() > 0 and model.decoder_last_layer.grad.abs().sum() > 0


def test_gradient_checkpointing_matches_and_frozen_encoder():
    torch.manual_seed(0)
    plain = SSVAE(tiny_config())
    cfg = tiny_config()
    cfg.encoder.gradient_checkpointing = cfg.decoder.gradient_checkpointing = True
    ckpt = SSVAE(cfg)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 5, 16, 16)
    for m in (plain, ckpt):
        m(x, sample=False)[0].square().mean().backward()
    torch.testing.assert_close(ckpt.encoder.conv_in.conv.weight.grad, plain.encoder.conv_in.conv.weight.grad)
    cfg = tiny_config()
    cfg.encoder.frozen = True
    frozen = SSVAE(cfg)
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
    assert all(p.requires_grad for p in frozen.decoder.parameters())


def test_save_and_load_round_trip(model, tmp_path):
    model.set_latent_stats(torch.linspace(-1, 1, 8), torch.linspace(0.5, 2, 8))
    try:
        model.save_pretrained(tmp_path / "vae")
        loaded = SSVAE.from_pretrained(tmp_path / "vae")
    finally:
        model.set_latent_stats(torch.zeros(8), torch.ones(8))
    assert loaded.config.latent_std == tuple(torch.linspace(0.5, 2, 8).tolist())
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for k in state:
        if k not in ("latent_mean", "latent_std"):
            assert torch.equal(state[k], loaded_state[k]), k
    torch.testing.assert_close(loaded.latent_std.flatten(), torch.linspace(0.5, 2, 8))
    with pytest.raises(FileNotFoundError, match="local folder"):
        SSVAE.from_pretrained(tmp_path / "missing")


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="temporal_downsample"):
        SSVAEConfig(encoder=EncoderConfig(temporal_downsample=(True,))).validate()
    with pytest.raises(ValueError, match="decoder.z_channels"):
        SSVAEConfig(decoder=DecoderConfig(z_channels=16)).validate()
    with pytest.raises(ValueError, match="encoder.norm"):
        EncoderConfig(norm="batchnorm").validate()
    with pytest.raises(ValueError, match="latent_std"):
        SSVAEConfig(latent_std=(1.0,) * 47).validate()
    with pytest.raises(ValueError, match="unknown encoder key"):
        SSVAEConfig.from_dict({"encoder": {"chh": 3}})


def shortcut_config(**kw) -> SSVAEConfig:
    """The tiny study's design: 4x space, 4x time, boundary shortcuts, residual branches starting at zero."""
    common = dict(ch=12, ch_mult=(1, 2, 4), num_res_blocks=1, num_mid_blocks=1, z_channels=48,
                  boundary_shortcuts=True, init="residual_zero")
    return SSVAEConfig(encoder=EncoderConfig(**common, temporal_downsample=(True, True), **kw),
                       decoder=DecoderConfig(**common, temporal_upsample=(True, True)))


def test_untrained_shortcut_vae_is_a_local_pooling():
    """With every residual branch at zero, decode(encode(x)) averages 4x4 pixel blocks of each frame: a video that is
    constant on those blocks comes back exactly, and any video comes back as its block means."""
    torch.manual_seed(0)
    model = SSVAE(shortcut_config(logvar_init=-8.0)).eval()
    blocks = torch.rand(2, 3, 9, 4, 4) * 2 - 1
    x = blocks.repeat_interleave(4, dim=3).repeat_interleave(4, dim=4)
    with torch.no_grad():
        posterior = model.posterior(x)
        torch.testing.assert_close(model.decoder(posterior.mode()), x, atol=1e-5, rtol=0)
        assert torch.allclose(posterior.logvar, torch.full_like(posterior.logvar, -8.0))
        noisy = torch.rand(1, 3, 5, 16, 16) * 2 - 1
        pooled = torch.nn.functional.avg_pool3d(noisy, (1, 4, 4)).repeat_interleave(4, 3).repeat_interleave(4, 4)
        torch.testing.assert_close(model.decoder(model.posterior(noisy).mode()), pooled, atol=1e-5, rtol=0)


def test_shortcut_vae_stays_causal_and_trains():
    torch.manual_seed(0)
    model = SSVAE(shortcut_config())
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    later = x.clone()
    later[:, :, 5:] = torch.rand(1, 3, 4, 16, 16)
    with torch.no_grad():
        a, b = model.encode(x), model.encode(later)
        assert torch.equal(a[:, :, :2], b[:, :, :2]) and not torch.equal(a[:, :, 2], b[:, :, 2])
    loss = (model.decoder(model.posterior(x).mode()) - x).abs().mean()
    loss.backward()
    # Zero-initialised branches still get gradients (their last conv first), so training can move them.
    assert model.decoder.up[0].block[0].conv2.conv.weight.grad.abs().sum() > 0
    assert model.encoder.conv_in.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kw,key", [
    (dict(encoder=EncoderConfig(ch=8, boundary_shortcuts=True, ch_mult=(1, 2), temporal_downsample=(True,),
                                z_channels=48)), "encoder.boundary_shortcuts"),
    (dict(decoder=DecoderConfig(ch=12, ch_mult=(1, 5), temporal_upsample=(True,), boundary_shortcuts=True,
                                z_channels=48)), "decoder.boundary_shortcuts"),
    (dict(encoder=EncoderConfig(init="zeros")), "encoder.init"),
    (dict(encoder=EncoderConfig(logvar_init=-4.0)), "encoder.logvar_init"),
])
def test_shortcut_config_errors_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        for part in kw.values():
            part.validate()


def patch_config(**kw) -> SSVAEConfig:
    """The main job's design: 2x2 pixel patches as channels (Wan 2.2's input), then 8x in space and 4x in time."""
    common = dict(ch=12, ch_mult=(1, 2, 4), num_res_blocks=1, num_mid_blocks=1, z_channels=48,
                  boundary_shortcuts=True, init="residual_zero", patch_size=2)
    return SSVAEConfig(encoder=EncoderConfig(**common, temporal_downsample=(True, True), **kw),
                       decoder=DecoderConfig(**common, temporal_upsample=(True, True)))


def test_patchify_inverts_and_orders_channels_by_colour_then_position():
    from vae.resample import patchify, unpatchify

    x = torch.randn(2, 3, 5, 8, 12)
    p = patchify(x, 2)
    assert p.shape == (2, 12, 5, 4, 6)
    assert torch.equal(unpatchify(p, 2), x)
    # Channel 4 * c + 2 * i + j holds pixel (2y + i, 2x + j) of colour c.
    assert torch.equal(p[:, 4 * 1 + 2 * 1 + 0], x[:, 1, :, 1::2, 0::2])


def test_patched_vae_compresses_by_patch_times_levels_and_stays_causal():
    torch.manual_seed(0)
    model = SSVAE(patch_config())
    assert model.spatial_compression == 8 and model.temporal_compression == 4
    x = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    later = x.clone()
    later[:, :, 5:] = torch.rand(1, 3, 4, 16, 24)
    with torch.no_grad():
        a, b = model.encode(x), model.encode(later)
        assert a.shape == (1, 48, 3, 2, 3)
        assert torch.equal(a[:, :, :2], b[:, :, :2]) and not torch.equal(a[:, :, 2], b[:, :, 2])
        assert model.decode(a).shape == x.shape
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(torch.zeros(1, 3, 5, 12, 16))


def test_untrained_patched_vae_is_still_a_local_pooling():
    """The shortcuts see the 2x2 patches as channels: untrained, every output pixel is a mean of pixels of its own
    8x8 block, so a video constant on those blocks comes back exactly, and one that is not does not."""
    torch.manual_seed(0)
    model = SSVAE(patch_config(logvar_init=-8.0)).eval()
    blocks = torch.rand(2, 3, 9, 2, 3) * 2 - 1
    x = blocks.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)
    noisy = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.decoder(model.posterior(x).mode()), x, atol=1e-5, rtol=0)
        out = model.decoder(model.posterior(noisy).mode())
    assert (out - noisy).abs().max() > 0.1
    # Within its block's range over the clip (time is pooled too): nothing leaks in from other blocks.
    lo = torch.nn.functional.max_pool3d(-noisy, (5, 8, 8)).neg().repeat_interleave(8, 3).repeat_interleave(8, 4)
    hi = torch.nn.functional.max_pool3d(noisy, (5, 8, 8)).repeat_interleave(8, 3).repeat_interleave(8, 4)
    assert bool(((out >= lo - 1e-5) & (out <= hi + 1e-5)).all())


def test_patched_vae_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = SSVAE(patch_config()).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(tmp_path / "m")
    again = SSVAE.from_pretrained(tmp_path / "m").eval()
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(again.decode(again.encode(x)), model.decode(model.encode(x)))


@pytest.mark.parametrize("kw,key", [
    (dict(decoder=DecoderConfig(patch_size=1, ch=12, ch_mult=(1, 2, 4), z_channels=48,
                                temporal_upsample=(True, True))), "decoder.patch_size"),
    (dict(encoder=EncoderConfig(patch_size=3, ch=12, ch_mult=(1, 2, 4), z_channels=48,
                                temporal_downsample=(True, True))), "encoder.patch_size"),
])
def test_patch_config_errors_name_the_key(kw, key):
    cfg = patch_config()
    with pytest.raises(ValueError, match=key):
        SSVAEConfig(encoder=kw.get("encoder", cfg.encoder), decoder=kw.get("decoder", cfg.decoder)).validate()
