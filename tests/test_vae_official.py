"""Released-weight compatibility: golden tiny outputs, and every released tensor name/shape and parameter count."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vae.config import SSVAEConfig
from vae.model import SSVAE
from vae.official import convert_official_state_dict, load_official

RELEASED_YAML = {
    "encoder_config": {
        "target": "ssvae.modules.autoencoding.vae.dc_3dvae.Encoder3D",
        "params": {
            "double_z": True, "norm": "rmsnorm", "temporal_compress_times": 4, "z_channels": 48, "resolution": 256,
            "in_channels": 3, "out_ch": 3, "ch": 32, "num_mid_blocks": 2, "temporal_upsample": [False, False, True, True],
            "ch_mult": [2, 4, 8, 16, 16], "attn_resolutions": [], "num_res_blocks": 3, "dropout": 0.0,
        },
    },
    "decoder_config": {
        "double_z": True, "norm": "rmsnorm", "temporal_compress_times": 4, "z_channels": 48, "resolution": 256,
        "in_channels": 3, "out_ch": 3, "ch": 32, "num_mid_blocks": 2, "temporal_upsample": [True, True, False, False],
        "ch_mult": [2, 4, 8, 16, 16], "attn_resolutions": [], "num_res_blocks": 3, "dropout": 0.0,
    },
}


@pytest.fixture(scope="module")
def golden(shared_dir):
    path = shared_dir / "reference" / "ssvae_golden_tiny.safetensors"
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    return path, config, load_file(str(path))


@pytest.mark.parametrize("channels_last", [True, False])
def test_golden_tiny_outputs(golden, monkeypatch, channels_last):
    """Both conv layouts (channels-last-3d, the default for speed, and contiguous) give the released numbers."""
    from vae.causal_conv import CausalConv3d

    monkeypatch.setattr(CausalConv3d, "channels_last", channels_last)
    path, config, tensors = golden
    torch.manual_seed(0)
    model = load_official(path, config).eval()
    with torch.no_grad():
        moments = model.encoder(tensors["io.input"])
        video = model.decoder(tensors["io.encoder_moments"][:, :48])
    assert moments.shape == tensors["io.encoder_moments"].shape
    assert moments.is_contiguous() and video.is_contiguous()  # callers get the plain layout either way
    torch.testing.assert_close(moments, tensors["io.encoder_moments"], atol=1e-4, rtol=0)
    torch.testing.assert_close(video, tensors["io.decoder_output"], atol=1e-4, rtol=0)
    # The model-level API agrees with the raw modules (stats default to 0/1).
    with torch.no_grad():
        torch.testing.assert_close(model.encode(tensors["io.input"]), moments[:, :48])


def test_golden_from_in_memory_lightning_state_dict(golden):
    _, config, tensors = golden
    state = {k: v for k, v in tensors.items() if k.startswith(("encoder.", "decoder."))}
    state["loss.logvar"] = torch.zeros(())
    state["mask_token"] = torch.full((1, 48, 1, 1, 1), 0.5)
    model = load_official(state, config)
    assert torch.equal(model.mask_token, state["mask_token"])


def test_lightning_ckpt_file(golden, tmp_path):
    _, config, tensors = golden
    state = {k: v for k, v in tensors.items() if k.startswith(("encoder.", "decoder."))}
    state["loss.discriminator.weight"] = torch.ones(2)
    ckpt = tmp_path / "ssvae.ckpt"
    torch.save({"state_dict": state, "global_step": 3}, ckpt)
    model = load_official(ckpt, config)
    torch.testing.assert_close(model.encoder.conv_in.conv.weight, tensors["encoder.conv_in.conv.weight"])


def test_unexpected_and_missing_keys_raise(golden):
    _, config, tensors = golden
    with pytest.raises(ValueError, match="unexpected keys"):
        convert_official_state_dict({"foo.bar": torch.zeros(1)})
    state = {k: v for k, v in tensors.items() if k.startswith("encoder.")}
    with pytest.raises(ValueError, match="missing"):
        load_official(state, config)


def test_released_names_shapes_and_counts(shared_dir):
    ref = json.loads((shared_dir / "reference" / "ssvae_official_state_dict_shapes.json").read_text())
    with torch.device("meta"):
        model = SSVAE(SSVAEConfig.from_official(RELEASED_YAML))
    ours = {k: list(v.shape) for k, v in model.state_dict().items() if k.startswith(("encoder.", "decoder."))}
    assert ours == ref["state_dict_shapes"]
    assert sum(p.numel() for p in model.encoder.parameters()) == ref["encoder_params"] == 141_568_832
    assert sum(p.numel() for p in model.decoder.parameters()) == ref["decoder_params"] == 173_609_027
    # Our defaults are the released configuration.
    assert SSVAEConfig.from_official(RELEASED_YAML) == SSVAEConfig()


def test_official_config_rejects_unknown_or_unsupported_keys():
    bad = {"encoder_config": dict(RELEASED_YAML["decoder_config"], chanels=3), "decoder_config": {}}
    with pytest.raises(ValueError, match="chanels"):
        SSVAEConfig.from_official(bad)
    bad = {"encoder_config": {"new_shuffle": True}, "decoder_config": {}}
    with pytest.raises(ValueError, match="new_shuffle"):
        SSVAEConfig.from_official(bad)
