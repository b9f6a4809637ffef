"""The diffusers pipeline export (dit/export_pipeline.py): a tiny trained run's folder loads in a fresh Python process
where our packages cannot be imported, and its videos equal our own sampler's, with and without a LoRA adapter loaded
through diffusers; runs the export cannot represent are refused by key; the single-file VAE code is generated
faithfully or not at all."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infra.config import ConfigError, load_config

pytest.importorskip("diffusers")
pytest.importorskip("peft")

HELPER = Path(__file__).parent / "helpers" / "run_exported_pipeline.py"


def our_videos(cfg, dit_folder):
    """dit.runtime.sample_videos (what tools.sample_t2v and the training's evaluation write), as the pipeline's "pt"
    output: (B, T, 3, H, W) in [0, 1]."""
    from dit.convert import from_diffusers
    from dit.runtime import build_first_stage, build_frozen_text_encoder, encode_text, sample_videos, uses_text_mask

    device = torch.device("cpu")
    model = from_diffusers(dit_folder).eval()
    first_stage, encoder = build_first_stage(cfg, device), build_frozen_text_encoder(cfg, device)
    states, mask = encode_text(encoder, cfg.sampling.prompts, device)
    videos = sample_videos(model, first_stage, states, mask if uses_text_mask(cfg, encoder) else None, cfg)
    return (videos.clamp(-1, 1) / 2 + 0.5).permute(0, 2, 1, 3, 4)


def test_exported_pipeline_runs_without_our_code_and_equals_our_sampler(lora_runs, lora_whole, tmp_path):
    from dit.export_pipeline import export_pipeline
    from dit.train_config import T2VTrainConfig

    _, root = lora_runs
    cfg = load_config(T2VTrainConfig, root / "base/config.yaml")
    folder = export_pipeline(cfg, root / "base/dit", tmp_path / "pipe")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_ssvae_cogvideox", "SSVAECogVideoXPipeline"]
    assert index["vae"] == ["autoencoder_kl_ssvae", "AutoencoderKLSSVAE"]
    assert index["text_mask"] is True  # MiniLM runs mask text padding: the pipeline must too
    assert (folder / "vae/autoencoder_kl_ssvae.py").is_file() and not (tmp_path / "pipe.partial").exists()

    theirs = _run_exported(folder, cfg, tmp_path, ["--lora", str(lora_whole / "lora")])
    assert tuple(theirs["videos"].shape) == (2, 9, 3, 32, 32)

    base = our_videos(cfg, root / "base/dit")
    assert base.std() > 0.01  # a video, not a constant
    torch.testing.assert_close(theirs["videos"], base, atol=1e-4, rtol=0)
    # The adapter loaded by diffusers into the pipeline = our sampler on the run's merged weights.
    adapted = our_videos(cfg, lora_whole / "dit")
    torch.testing.assert_close(theirs["lora_videos"], adapted, atol=1e-4, rtol=0)
    assert (adapted - base).abs().max() > 1e-3  # the adapter changes the videos
    if (tmp_path / "videos.mp4").exists():  # written when PyAV is installed, for a person to look at
        assert (tmp_path / "videos.mp4").stat().st_size > 0


def _run_exported(folder, cfg, tmp_path, extra=()):
    """The helper's videos of an exported folder, in a fresh process without our packages."""
    from safetensors.torch import load_file

    s = cfg.sampling
    out = tmp_path / "videos.safetensors"
    cmd = [sys.executable, "-I", str(HELPER), str(folder), str(out), "--seed", str(s.seed), "--steps", str(s.steps),
           "--guidance", str(s.guidance), *extra]
    for prompt in s.prompts:
        cmd += ["--prompt", prompt]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return load_file(str(out))


def test_runs_on_transformed_latents_export_and_equal_our_sampler(lora_runs, tmp_path):
    """The main job's DiT trains on whitened latents (the study's controls also on checkerboarded ones): the pipeline
    must undo the same transform before decoding, from its own config, without our code."""
    from dit.export_pipeline import build_pipeline, export_pipeline
    from dit.train_config import T2VTrainConfig
    from vae.latent_transform import ChannelWhitening, CheckerboardSign

    _, root = lora_runs
    channels = json.loads((root / "base/dit/config.json").read_text())["in_channels"]
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(channels, channels, generator=generator)  # correlated channels: a whitening that mixes
    latents = torch.einsum("dc,bcfhw->bdfhw", mixing, torch.randn(8, channels, 3, 4, 4, generator=generator)) + 0.5
    whiten = ChannelWhitening.fit(latents).save(tmp_path / "whiten.safetensors")
    cfg = load_config(T2VTrainConfig, root / "base/config.yaml", [f"first_stage.latent_transform={whiten}"])
    folder = export_pipeline(cfg, root / "base/dit", tmp_path / "pipe")
    stored = json.loads((folder / "model_index.json").read_text())["latent_transform"]
    assert stored["kind"] == "whiten" and len(stored["inverse_matrix"]) == channels
    theirs = _run_exported(folder, cfg, tmp_path)["videos"]
    ours = our_videos(cfg, root / "base/dit")
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    plain = our_videos(load_config(T2VTrainConfig, root / "base/config.yaml"), root / "base/dit")
    assert (ours - plain).abs().max() > 1e-2  # the transform changes what the same DiT's samples decode to

    checker = CheckerboardSign(2).save(tmp_path / "checker.safetensors")
    cfg = load_config(T2VTrainConfig, root / "base/config.yaml", [f"first_stage.latent_transform={checker}"])
    pipe = build_pipeline(cfg, root / "base/dit")
    s = cfg.sampling
    frames = pipe(s.prompts, seed=s.seed, num_inference_steps=s.steps, guidance_scale=s.guidance,
                  output_type="pt").frames
    torch.testing.assert_close(frames, our_videos(cfg, root / "base/dit"), atol=1e-4, rtol=0)


@pytest.mark.parametrize("transform, message", [
    ({"kind": "rotate"}, r"latent_transform\.kind: must be one of"),
    ({"kind": "checkerboard", "cell": 0}, r"latent_transform\.cell"),
    ({"kind": "whiten", "mean": [0.0] * 3, "inverse_matrix": [[1.0] * 4] * 4}, r"latent_transform\.mean: needs 4"),
    ({"kind": "whiten", "mean": [0.0] * 4, "inverse_matrix": [[1.0] * 3] * 4},
     r"latent_transform\.inverse_matrix: needs 4x4"),
])
def test_a_bad_latent_transform_entry_names_its_key(transform, message):
    from dit.pipeline_ssvae_cogvideox import check_latent_transform

    with pytest.raises(ValueError, match=message):
        check_latent_transform(transform, 4)


def test_export_refuses_runs_it_cannot_represent(lora_runs, tmp_path):
    from dit.export_pipeline import export_pipeline
    from dit.train_config import T2VTrainConfig

    _, root = lora_runs
    transform = tmp_path / "transform.safetensors"
    transform.write_bytes(b"")
    cfg = load_config(T2VTrainConfig, root / "base/config.yaml", [f"first_stage.latent_transform={transform}"])
    with pytest.raises(ValueError, match=r"latent transform .*transform\.safetensors cannot be read"):
        export_pipeline(cfg, root / "base/dit", tmp_path / "pipe")
    cfg = load_config(T2VTrainConfig, root / "base/config.yaml")
    with pytest.raises(FileNotFoundError, match=r"no_dit is not a diffusers transformer folder"):
        export_pipeline(cfg, tmp_path / "no_dit", tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()


def test_standalone_vae_code_compiles_alone_or_names_what_breaks_it(tmp_path, monkeypatch):
    from vae import standalone

    import importlib.util

    path = standalone.write_standalone_module(tmp_path / "code")
    spec = importlib.util.spec_from_file_location("autoencoder_kl_ssvae", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "autoencoder_kl_ssvae", module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    from vae.diffusers_model import AutoencoderKLSSVAE

    assert module.AutoencoderKLSSVAE is not AutoencoderKLSSVAE  # its own class, from its own file
    assert not any(line.startswith(("from vae", "from infra", "import vae")) for line in path.read_text().splitlines())
    (tmp_path / "clash_a.py").write_text("LIMIT = 1\n")
    (tmp_path / "clash_b.py").write_text("LIMIT = 2\n")
    (tmp_path / "needs_more.py").write_text("from vae.layers import ResnetBlock\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(standalone, "MODULES", ("clash_a", "clash_b"))
    with pytest.raises(ValueError, match=r"'LIMIT' is defined by both clash_a and clash_b"):
        standalone.standalone_source()
    monkeypatch.setattr(standalone, "MODULES", ("needs_more",))
    with pytest.raises(ValueError, match=r"does not define ResnetBlock \(imported by needs_more\)"):
        standalone.standalone_source()
