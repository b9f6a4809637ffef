"""Checkpoint conversion: diffusers folders and models, export back to diffusers, CogVideoX SAT checkpoints."""

import json

import pytest
import torch

from dit import DiTConfig, export_diffusers, export_sat, from_diffusers, from_sat
from dit.convert import config_from_diffusers, diffusers_config, sat_state_dict
from test_dit_transformer import inputs, random_reference, reference_output, tiny_config

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("positional_embedding", ["rope", "sincos"])
def test_from_diffusers_folder(tmp_path, positional_embedding):
    config = tiny_config(positional_embedding=positional_embedding, in_channels=48, patch_size=1)
    ref = random_reference(config)
    ref.save_pretrained(tmp_path)
    ours = from_diffusers(tmp_path).eval()
    assert ours.config == config
    latents, text, timestep = inputs(config, 2, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours(latents, text, timestep), reference_output(ref, config, latents, text, timestep),
                                   atol=1e-4, rtol=0)


def test_from_diffusers_state_dict_needs_config():
    config = tiny_config()
    ref = random_reference(config)
    with pytest.raises(ValueError, match="config"):
        from_diffusers(ref.state_dict())
    ours = from_diffusers(ref.state_dict(), config=config, gradient_checkpointing=True)
    assert ours.gradient_checkpointing


def test_config_roundtrip_and_cogvideox_defaults():
    # diffusers' defaults are CogVideoX-2B: sample_frames 49 pixel frames = 13 latent frames.
    assert config_from_diffusers({}) == DiTConfig.preset("cogvideox-2b")
    five_b = DiTConfig.preset("cogvideox-5b")
    assert config_from_diffusers(diffusers_config(five_b)) == five_b
    assert config_from_diffusers({"in_channels": 32, "out_channels": 16}).output_channels == 16
    with pytest.raises(ValueError, match="ofs_embed_dim"):
        config_from_diffusers({"ofs_embed_dim": 512})


@pytest.mark.parametrize("patch_size_t", [None, 2])
def test_export_diffusers_loads_in_diffusers(tmp_path, patch_size_t):
    config = tiny_config(patch_size_t=patch_size_t, patch_bias=False)
    torch.manual_seed(3)
    from dit import CogVideoXTransformer

    ours = CogVideoXTransformer(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    export_diffusers(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "CogVideoXTransformer3DModel"
    loaded = diffusers.CogVideoXTransformer3DModel.from_pretrained(tmp_path).eval()
    latents, text, timestep = inputs(config, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(reference_output(loaded, config, latents, text, timestep),
                                   ours(latents, text, timestep), atol=1e-4, rtol=0)


@pytest.mark.parametrize("positional_embedding, patch_size", [("rope", 2), ("sincos", 1), ("learned", 2)])
def test_sat_checkpoint_roundtrip(tmp_path, positional_embedding, patch_size):
    """A fake SAT checkpoint, written from a diffusers model through the inverse mapping, converts back to a
    model whose outputs equal the diffusers model's."""
    config = tiny_config(positional_embedding=positional_embedding, patch_size=patch_size)
    ref = random_reference(config)
    sat = export_sat(from_diffusers(ref))
    module = sat["module"]
    # What real SAT checkpoints carry: 12-chunk fused modulation, fused qkv, a Conv2d patch kernel, rotary
    # buffers, the 2B's fixed sin-cos table, and the VAE / text encoder outside the diffusion model.
    assert module["model.diffusion_model.mixins.adaln_layer.adaLN_modulations.1.1.weight"].shape == (12 * 64, 32)
    assert module["model.diffusion_model.transformer.layers.0.attention.query_key_value.weight"].shape == (3 * 64, 64)
    assert module["model.diffusion_model.mixins.patch_embed.proj.weight"].shape == (64, 16, patch_size, patch_size)
    module["model.diffusion_model.mixins.pos_embed.freqs_sin"] = torch.zeros(3)
    module.setdefault("model.diffusion_model.mixins.pos_embed.pos_embedding", torch.zeros(1, 3, 64))
    module["first_stage_model.encoder.conv_in.weight"] = torch.zeros(3)
    module["conditioner.embedders.0.transformer.shared.weight"] = torch.zeros(3)
    path = tmp_path / "1000" / "mp_rank_00_model_states.pt"
    path.parent.mkdir()
    torch.save(sat, path)

    ours = from_sat(path.parent, config).eval()
    latents, text, timestep = inputs(config, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(latents, text, timestep), reference_output(ref, config, latents, text, timestep),
                                   atol=1e-4, rtol=0)


def test_sat_unknown_keys_are_reported():
    config = tiny_config()
    sat = sat_state_dict(export_sat(from_diffusers(random_reference(config))))
    sat["mixins.ofs_embed.0.weight"] = torch.zeros(2)
    from dit.convert import state_dict_from_sat

    with pytest.raises(ValueError, match="ofs_embed"):
        state_dict_from_sat(sat, config)
