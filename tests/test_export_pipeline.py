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
    from safetensors.torch import load_file

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

    s = cfg.sampling
    out = tmp_path / "videos.safetensors"
    cmd = [sys.executable, "-I", str(HELPER), str(folder), str(out), "--seed", str(s.seed), "--steps", str(s.steps),
           "--guidance", str(s.guidance), "--lora", str(lora_whole / "lora")]
    for prompt in s.prompts:
        cmd += ["--prompt", prompt]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "ok (2, 9, 3, 32, 32)" in proc.stdout
    theirs = load_file(str(out))

    base = our_videos(cfg, root / "base/dit")
    assert base.std() > 0.01  # a video, not a constant
    torch.testing.assert_close(theirs["videos"], base, atol=1e-4, rtol=0)
    # The adapter loaded by diffusers into the pipeline = our sampler on the run's merged weights.
    adapted = our_videos(cfg, lora_whole / "dit")
    torch.testing.assert_close(theirs["lora_videos"], adapted, atol=1e-4, rtol=0)
    assert (adapted - base).abs().max() > 1e-3  # the adapter changes the videos
    if (tmp_path / "videos.mp4").exists():  # written when PyAV is installed, for a person to look at
        assert (tmp_path / "videos.mp4").stat().st_size > 0


def test_export_refuses_runs_it_cannot_represent(lora_runs, tmp_path):
    from dit.export_pipeline import export_pipeline
    from dit.train_config import T2VTrainConfig

    _, root = lora_runs
    transform = tmp_path / "transform.safetensors"
    transform.write_bytes(b"")
    cfg = load_config(T2VTrainConfig, root / "base/config.yaml", [f"first_stage.latent_transform={transform}"])
    with pytest.raises(ConfigError, match=r"first_stage\.latent_transform: .* not exported"):
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
