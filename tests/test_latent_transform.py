"""The study's spectral controls: invertible latent transforms that change the spectrum and nothing else."""

import pytest
import torch
import torch.nn.functional as F

from tools.spectral import SpectralConfig, analyze_latents
from vae.config import DecoderConfig, EncoderConfig, SSVAEConfig
from vae.first_stage import FirstStageConfig, TransformedFirstStage, load_first_stage
from vae.latent_transform import ChannelWhitening, CheckerboardSign, load_latent_transform
from vae.model import SSVAE


def smooth_correlated_latents(n: int = 8, channels: int = 16, seed: int = 0) -> torch.Tensor:
    """Spatially smooth latents (N, C, 3, 16, 16) whose channels share a few strong modes."""
    g = torch.Generator().manual_seed(seed)
    modes = torch.randn(n, 3, 3, 16, 16, generator=g)
    modes = F.avg_pool3d(F.pad(modes, (2, 2, 2, 2, 0, 0), mode="circular"), (1, 5, 5), stride=1)
    mixing = torch.randn(channels, 3, generator=g) * torch.tensor([4.0, 2.0, 1.0])
    z = torch.einsum("cm,nmfhw->ncfhw", mixing, modes)
    return z + 0.05 * torch.randn(z.shape, generator=g)


def tiny_ssvae() -> SSVAE:
    torch.manual_seed(0)
    common = dict(ch=4, ch_mult=(2, 4, 8, 8), num_res_blocks=1, num_mid_blocks=1, z_channels=8,
                  mid_attention=False)
    enc = EncoderConfig(**common, temporal_downsample=(False, True, True))
    dec = DecoderConfig(**common, temporal_upsample=(True, True, False))
    model = SSVAE(SSVAEConfig(encoder=enc, decoder=dec))
    model.set_latent_stats(torch.linspace(-0.5, 0.5, 8), torch.linspace(0.5, 2, 8))
    return model


def test_checkerboard_inverts_exactly_and_moves_energy_to_high_frequencies():
    z = smooth_correlated_latents()
    control = CheckerboardSign(cell=1)
    flipped = control(z)
    assert torch.equal(control.inverse(flipped), z)  # exact: multiplying by +/-1 twice
    assert torch.equal(control.signs(2, 2), torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    before, after = (analyze_latents(x, SpectralConfig()) for x in (z, flipped))
    assert before["frequency"]["low_freq_ratio"] > 5  # a smooth field
    assert after["frequency"]["low_freq_ratio"] < 0.2 * before["frequency"]["low_freq_ratio"]
    # Orthogonal and the same in every channel: the channel eigenspectrum is unchanged.
    assert after["eigenspectrum"]["effective_rank"] == pytest.approx(before["eigenspectrum"]["effective_rank"],
                                                                      rel=0.05)


def test_checkerboard_cells_flip_whole_blocks():
    signs = CheckerboardSign(cell=2).signs(4, 4)
    assert torch.equal(signs[:2, :2], torch.ones(2, 2)) and torch.equal(signs[:2, 2:], -torch.ones(2, 2))
    with pytest.raises(ValueError, match="cell"):
        CheckerboardSign(cell=0)


def test_whitening_flattens_the_channel_eigenspectrum_and_inverts():
    z = smooth_correlated_latents()
    control = ChannelWhitening.fit(z)
    white = control(z)
    cov = torch.cov(white.transpose(0, 1).reshape(z.shape[1], -1).double())
    torch.testing.assert_close(cov, torch.eye(z.shape[1], dtype=torch.float64), atol=2e-3, rtol=0)
    torch.testing.assert_close(control.inverse(white), z, atol=1e-4, rtol=1e-5)
    before, after = (analyze_latents(x, SpectralConfig())["eigenspectrum"]["effective_rank"] for x in (z, white))
    assert before < 5 and after > 0.95 * z.shape[1]


def test_whitening_fit_needs_enough_positions():
    with pytest.raises(ValueError, match="cannot estimate"):
        ChannelWhitening.fit(torch.randn(1, 16, 1, 2, 2))


@pytest.mark.parametrize("make", [lambda: CheckerboardSign(cell=2), lambda: ChannelWhitening.fit(
    smooth_correlated_latents())])
def test_transform_files_round_trip(tmp_path, make):
    control = make()
    loaded = load_latent_transform(control.save(tmp_path / "t.safetensors"))
    z = smooth_correlated_latents(n=2)
    assert type(loaded) is type(control)
    assert torch.equal(loaded(z), control(z))


def test_bad_transform_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_latent_transform(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_latent_transform(bad)


@pytest.mark.parametrize("kind", ["checkerboard", "whiten"])
def test_reconstructions_through_a_control_equal_the_source(tmp_path, kind):
    model = tiny_ssvae()
    model.save_pretrained(tmp_path / "vae")
    source = load_first_stage(FirstStageConfig(kind="ssvae", path=str(tmp_path / "vae")))
    x = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    z = source.encode(x)
    control = CheckerboardSign(cell=1) if kind == "checkerboard" else ChannelWhitening.fit(
        torch.cat([source.encode(torch.rand(2, 3, 9, 32, 32) * 2 - 1) for _ in range(4)]))
    path = control.save(tmp_path / f"{kind}.safetensors")
    stage = load_first_stage(FirstStageConfig(kind="ssvae", path=str(tmp_path / "vae"), latent_transform=str(path)))
    assert isinstance(stage, TransformedFirstStage)
    assert stage.latent_shape(9, 32, 32) == source.latent_shape(9, 32, 32)
    transformed = stage.encode(x)
    assert not torch.allclose(transformed, z)  # the DiT sees other latents...
    reference = source.decode(z)
    through = stage.decode(transformed)
    if kind == "checkerboard":
        assert torch.equal(through, reference)  # ...and the same reconstructions, exactly
    else:
        torch.testing.assert_close(through, reference, atol=1e-5, rtol=0)


def test_first_stage_names_a_missing_transform(tmp_path):
    # Validation takes the path as a value (a study plans a control before its source is trained); loading checks it.
    config = FirstStageConfig(kind="ssvae", path=str(tmp_path), latent_transform=str(tmp_path / "nope"))
    config.validate()
    with pytest.raises(FileNotFoundError, match=r"first_stage\.latent_transform: .*nope"):
        load_first_stage(config)
