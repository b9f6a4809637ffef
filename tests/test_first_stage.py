"""The first-stage interface over SSVAE and tiny random diffusers Wan / CogVideoX VAEs saved to tmp folders."""

import pytest
import torch

from vae.config import DecoderConfig, EncoderConfig, SSVAEConfig
from vae.first_stage import (
    CogVideoXFirstStage,
    FirstStageConfig,
    SSVAEFirstStage,
    WanFirstStage,
    load_first_stage,
)
from vae.inference import InferenceConfig
from vae.model import SSVAE


def tiny_ssvae() -> SSVAE:
    torch.manual_seed(0)
    common = dict(ch=4, ch_mult=(2, 4, 8, 16, 16), num_res_blocks=1, num_mid_blocks=2, z_channels=8)
    model = SSVAE(SSVAEConfig(encoder=EncoderConfig(**common), decoder=DecoderConfig(**common)))
    model.set_latent_stats(torch.linspace(-1, 1, 8), torch.linspace(0.5, 2, 8))
    return model


def test_ssvae_first_stage_from_folder_and_memory(tmp_path):
    model = tiny_ssvae()
    model.save_pretrained(tmp_path / "ssvae")
    stage = load_first_stage(FirstStageConfig(kind="ssvae", path=str(tmp_path / "ssvae"), chunk_latent_frames=1))
    assert isinstance(stage, SSVAEFirstStage)
    assert (stage.latent_channels, stage.temporal_compression, stage.spatial_compression) == (8, 4, 16)
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    z = stage.encode(x)
    assert z.shape == (1, *stage.latent_shape(5, 32, 32)) == (1, 8, 2, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(z, model.eval().encode(x), atol=1e-5, rtol=0)
    video = stage.decode(z)
    assert video.shape == x.shape and video.abs().max() <= 1
    in_memory = SSVAEFirstStage(model, InferenceConfig())
    torch.testing.assert_close(in_memory.encode(x), z, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in stage.parameters())
    stage.train()
    assert not stage.vae.training


def test_wan_first_stage_normalises_with_config_stats(tmp_path):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.0, 2.0, 0.5, 1.5]
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=mean, latents_std=std,
    )
    vae.save_pretrained(tmp_path / "wan")
    stage = load_first_stage(FirstStageConfig(kind="wan", path=str(tmp_path / "wan")))
    assert isinstance(stage, WanFirstStage)
    assert (stage.latent_channels, stage.temporal_compression, stage.spatial_compression) == (4, 4, 8)
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    z = stage.encode(x)
    assert z.shape == (1, *stage.latent_shape(5, 32, 32))
    with torch.no_grad():
        raw = vae.eval().encode(x).latent_dist.mode()
    expected = (raw - torch.tensor(mean).view(1, 4, 1, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)
    video = stage.decode(z)
    assert video.shape == x.shape and video.abs().max() <= 1
    # The posterior in normalised units (what a latent cache stores): mean as encode, log-variance - 2 log std.
    posterior_mean, logvar = stage.encode_posterior(x)
    torch.testing.assert_close(posterior_mean, z, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        raw_logvar = vae.encode(x).latent_dist.logvar
    torch.testing.assert_close(logvar, raw_logvar - 2 * torch.tensor(std).log().view(1, 4, 1, 1, 1), atol=1e-5,
                               rtol=1e-5)


def test_cogvideox_first_stage_scales(tmp_path):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(32, 32, 32, 32), latent_channels=4, layers_per_block=1, norm_num_groups=8,
        scaling_factor=0.7,
    )
    vae.save_pretrained(tmp_path / "cog")
    stage = load_first_stage(FirstStageConfig(kind="cogvideox", path=str(tmp_path / "cog"), dtype="float32"))
    assert isinstance(stage, CogVideoXFirstStage)
    assert (stage.latent_channels, stage.temporal_compression, stage.spatial_compression) == (4, 4, 8)
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    z = stage.encode(x)
    with torch.no_grad():
        raw = vae.eval().encode(x).latent_dist.mode()
    torch.testing.assert_close(z, raw * 0.7)
    posterior_mean, logvar = stage.encode_posterior(x)
    with torch.no_grad():
        raw_logvar = vae.encode(x).latent_dist.logvar
    torch.testing.assert_close(posterior_mean, z)
    torch.testing.assert_close(logvar, raw_logvar + 2 * torch.tensor(0.7).log(), atol=1e-5, rtol=1e-5)
    assert z.shape == (1, *stage.latent_shape(9, 16, 16)) == (1, 4, 3, 2, 2)
    assert stage.decode(z).shape == x.shape


def test_first_stage_config_errors(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        FirstStageConfig(kind="sd", path="x").validate()
    with pytest.raises(ValueError, match="dtype"):
        FirstStageConfig(path="x", dtype="fp8").validate()
    with pytest.raises(ValueError, match="path"):
        FirstStageConfig().validate()
    with pytest.raises(FileNotFoundError, match="local folders"):
        load_first_stage(FirstStageConfig(path=str(tmp_path / "nope")))
