"""The diffusers-native SSVAE: the same numbers as our SSVAE (and the released golden outputs), diffusers' folder
layout with an exact round trip, tiling and slicing, and the converter from our folders and the released checkpoint."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vae.config import DecoderConfig, EncoderConfig, SSVAEConfig
from vae.convert_diffusers import convert, main
from vae.diffusers_model import AutoencoderKLSSVAE
from vae.model import SSVAE
from vae.official import load_official


@pytest.fixture(scope="module")
def tiny_ssvae():
    torch.manual_seed(0)
    common = dict(ch=4, ch_mult=(1, 2, 2), num_res_blocks=1, num_mid_blocks=1, z_channels=6)
    model = SSVAE(SSVAEConfig(encoder=EncoderConfig(**common, temporal_downsample=(True, True)),
                              decoder=DecoderConfig(**common, temporal_upsample=(True, True)))).eval()
    model.set_latent_stats(torch.linspace(-0.1, 0.1, 6), torch.linspace(0.5, 1.5, 6))
    return model


def test_same_numbers_as_our_ssvae_and_stats_in_the_config(tiny_ssvae):
    model = AutoencoderKLSSVAE.from_ssvae(tiny_ssvae).eval()
    x = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(x).latent_dist
        ours = tiny_ssvae.posterior(x)
        torch.testing.assert_close(posterior.mean, ours.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(posterior.logvar, ours.logvar, atol=1e-5, rtol=0)
        assert posterior.mode().shape == (2, 6, 3, 4, 4)
        torch.testing.assert_close(model.decode(posterior.mode()).sample, tiny_ssvae.decoder(ours.mode()),
                                   atol=1e-5, rtol=0)
        # Raw latents, normalised by the pipeline with the config's statistics, are what our encode() gives.
        mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)
        torch.testing.assert_close((posterior.mode() - mean) / std, tiny_ssvae.encode(x), atol=1e-5, rtol=0)
    assert model.spatial_compression_ratio == 4 and model.temporal_compression_ratio == 4


def test_save_then_load_is_exact_in_diffusers_layout(tiny_ssvae, tmp_path):
    model = AutoencoderKLSSVAE.from_ssvae(tiny_ssvae)
    model.save_pretrained(str(tmp_path / "vae"))
    assert {p.name for p in (tmp_path / "vae").iterdir()} >= {"config.json", "diffusion_pytorch_model.safetensors"}
    assert json.loads((tmp_path / "vae/config.json").read_text())["_class_name"] == "AutoencoderKLSSVAE"
    loaded = AutoencoderKLSSVAE.from_pretrained(str(tmp_path / "vae"))
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == \
        {k: v for k, v in model.config.items() if not k.startswith("_")}
    back = loaded.to_ssvae()
    assert all(torch.equal(v, tiny_ssvae.state_dict()[k]) for k, v in back.state_dict().items())


def test_tiling_chunks_exactly_and_slicing_changes_nothing(tiny_ssvae):
    model = AutoencoderKLSSVAE.from_ssvae(tiny_ssvae, chunk_latent_frames=1, tile_sample_size=16,
                                          tile_sample_overlap=8).eval()
    x = torch.rand(2, 3, 13, 16, 16) * 2 - 1
    with torch.no_grad():
        whole = model.encode(x).latent_dist
        decoded = model.decode(whole.mode()).sample
        model.enable_tiling()  # 16 px frames fit one tile: only the temporal chunks apply, which are exact
        chunked = model.encode(x).latent_dist
        torch.testing.assert_close(chunked.mean, whole.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(chunked.logvar, whole.logvar, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.decode(whole.mode()).sample, decoded, atol=1e-5, rtol=0)
        model.disable_tiling()
        model.enable_slicing()
        torch.testing.assert_close(model.encode(x).latent_dist.mean, whole.mean, atol=1e-5, rtol=0)
        # Frames larger than the tile are tiled spatially (blended): the shape is right and values stay close.
        model.enable_tiling(tile_sample_size=16, tile_sample_overlap=8)
        big = torch.rand(1, 3, 5, 32, 32) * 2 - 1
        tiled = model.encode(big).latent_dist.mode()
        model.disable_tiling()
        assert tiled.shape == model.encode(big).latent_dist.mode().shape


def test_bad_input_names_the_problem(tiny_ssvae):
    model = AutoencoderKLSSVAE.from_ssvae(tiny_ssvae)
    with pytest.raises(ValueError, match="frame count T must be 1 \\+ 4k"):
        model.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="latent must have 6 channels"):
        model.decode(torch.zeros(1, 5, 2, 4, 4))


def test_converter_from_our_folder(tiny_ssvae, tmp_path):
    tiny_ssvae.save_pretrained(tmp_path / "ours")
    main(["--ssvae", str(tmp_path / "ours"), "--out", str(tmp_path / "diffusers")])
    loaded = AutoencoderKLSSVAE.from_pretrained(str(tmp_path / "diffusers"))
    assert loaded.config.latents_std == pytest.approx(tiny_ssvae.config.latent_std)
    assert torch.equal(loaded.encoder.conv_in.conv.weight, tiny_ssvae.encoder.conv_in.conv.weight)
    with pytest.raises(ValueError, match="exactly one"):
        convert(tmp_path / "x")


def test_converted_folder_loads_through_automodel_without_our_code(tiny_ssvae, tmp_path):
    """The folder carries the model's code (vae.standalone): diffusers.AutoModel loads it in a process where our
    packages cannot be imported, with the same decoder numbers."""
    import os
    import subprocess
    import sys

    from safetensors.torch import save_file

    tiny_ssvae.save_pretrained(tmp_path / "ours")
    main(["--ssvae", str(tmp_path / "ours"), "--out", str(tmp_path / "diffusers")])
    assert json.loads((tmp_path / "diffusers/config.json").read_text())["auto_map"] == {
        "AutoModel": "autoencoder_kl_ssvae.AutoencoderKLSSVAE"}
    z = torch.randn(1, 6, 2, 3, 3)
    save_file({"z": z}, str(tmp_path / "z.safetensors"))
    script = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("vae", "dit", "infra", "tools"):
            raise ImportError(name)
sys.meta_path.insert(0, Block())
import torch
from diffusers import AutoModel
from safetensors.torch import load_file, save_file
model = AutoModel.from_pretrained({str(tmp_path / "diffusers")!r}, trust_remote_code=True)
with torch.no_grad():
    video = model.decode(load_file({str(tmp_path / "z.safetensors")!r})["z"]).sample
save_file({{"video": video.contiguous()}}, {str(tmp_path / "video.safetensors")!r})
print(type(model).__name__, type(model).__module__)
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "AutoencoderKLSSVAE" in proc.stdout and "autoencoder_kl_ssvae" in proc.stdout
    with torch.no_grad():
        expected = tiny_ssvae.decoder(z)
    torch.testing.assert_close(load_file(str(tmp_path / "video.safetensors"))["video"], expected, atol=1e-5, rtol=0)


def test_golden_released_numbers_through_the_converter(shared_dir, tmp_path):
    path = shared_dir / "reference" / "ssvae_golden_tiny.safetensors"
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    tensors = load_file(str(path))
    state = {k: v for k, v in tensors.items() if k.startswith(("encoder.", "decoder."))}
    state["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": state}, tmp_path / "ssvae.ckpt")  # a Lightning checkpoint, read weights-only
    convert(tmp_path / "out", official=tmp_path / "ssvae.ckpt", official_config=config)
    model = AutoencoderKLSSVAE.from_pretrained(str(tmp_path / "out")).eval()
    ours = load_official(path, config).eval()
    with torch.no_grad():
        moments = torch.cat([model.encode(tensors["io.input"]).latent_dist.mean,
                             model.encode(tensors["io.input"]).latent_dist.logvar], dim=1)
        video = model.decode(tensors["io.encoder_moments"][:, :48]).sample
        torch.testing.assert_close(moments, ours.encoder(tensors["io.input"]), atol=1e-5, rtol=0)
        torch.testing.assert_close(video, ours.decoder(tensors["io.encoder_moments"][:, :48]), atol=1e-5, rtol=0)
    torch.testing.assert_close(moments, tensors["io.encoder_moments"], atol=1e-4, rtol=0)
    torch.testing.assert_close(video, tensors["io.decoder_output"], atol=1e-4, rtol=0)
