"""Every shipped YAML validates against its schema, and bad configs fail at start-up naming the key and the file."""
from pathlib import Path

import pytest

from infra.config import ConfigError, load_config
from vae.train_config import VAETrainConfig

ROOT = Path(__file__).resolve().parents[1]
VAE_CONFIGS = sorted((ROOT / "configs/vae").glob("*.yaml"))


@pytest.mark.parametrize("path", VAE_CONFIGS, ids=lambda p: p.name)
def test_vae_configs_validate(path):
    cfg = load_config(VAETrainConfig, path, ["data.video_roots=/data/videos", "data.image_roots=/data/images"])
    assert (cfg.data.num_frames - 1) % 4 == 0


def test_released_stage_configs_follow_the_recipe():
    s1 = load_config(VAETrainConfig, ROOT / "configs/vae/stage1_256p.yaml", ["data.video_roots=x", "data.image_roots=y"])
    s2 = load_config(VAETrainConfig, ROOT / "configs/vae/stage2_512p.yaml", ["data.video_roots=x", "data.image_roots=y"])
    assert (s1.data.height, s2.data.height) == (256, 512)
    assert s1.loss.lcr.enabled and s1.loss.lmr.enabled and s1.loss.disc_start == 25001
    assert s2.model.encoder.frozen and not s2.loss.lcr.enabled and s2.loss.lmr.enabled and s2.loss.disc_start == 0
    assert s2.loss.lmr.settings_for(512) == ([0.6, 0.1, 0.15, 0.15], [2, 2, 2])
    assert (s1.optimizer.lr, s1.disc_optimizer.lr, s1.optimizer.warmup_start_lr) == (5e-5, 5e-6, 2e-6)
    assert s1.model.encoder.ch == 32 and list(s1.model.encoder.ch_mult) == [2, 4, 8, 16, 16]
    assert s1.deepspeed.precision == "bf16"


@pytest.mark.parametrize("overrides, key", [
    (["data.num_frames=16"], "data.num_frames"),                # not 1 + 4k
    (["data.num_framez=17"], "data.num_framez"),                # misspelt
    (["run.max_steps=many"], "run.max_steps"),                  # wrong type
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),       # impossible value
    (["optimizer.betas=[0.9]"], "optimizer.betas"),
    (["model.encoder.z_channels=16"], "z_channels"),            # encoder and decoder disagree
    (["loss.lcr.enabled=true", "model.encoder.frozen=true"], "loss.lcr.enabled"),  # LCR needs a trainable encoder
])
def test_bad_values_name_key_and_file(overrides, key):
    path = ROOT / "configs/vae/tiny.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(VAETrainConfig, path, overrides)
    assert key in str(err.value) and str(path) in str(err.value)


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match="data.video_roots"):
        load_config(VAETrainConfig, ROOT / "configs/vae/stage1_256p.yaml")


def test_missing_file_and_malformed_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(VAETrainConfig, ROOT / "configs/vae/nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(VAETrainConfig, ROOT / "configs/vae/tiny.yaml", ["run.max_steps"])


@pytest.mark.parametrize("value, expected", [("no", "no"), ("yes", "yes"), ("auto", "auto"), ("false", "no"),
                                             ("torch", "torch")])
def test_fused_optimizer_accepts_yaml_yes_no(value, expected):
    # YAML (and so a key=value override) reads a bare yes/no as a boolean; the setting must still mean yes/no.
    cfg = load_config(VAETrainConfig, ROOT / "configs/vae/tiny.yaml",
                      ["data.video_roots=x", "data.image_roots=y", f"deepspeed.fused_optimizer={value}"])
    assert cfg.deepspeed.fused_optimizer == expected
    with pytest.raises(ConfigError, match="deepspeed.fused_optimizer"):
        load_config(VAETrainConfig, ROOT / "configs/vae/tiny.yaml",
                    ["data.video_roots=x", "data.image_roots=y", "deepspeed.fused_optimizer=maybe"])


# (time, space, channels) of every shipped VAE config: a change of compression is a change of study, never a side
# effect of an edit elsewhere.
COMPRESSION = {"baseline_256p.yaml": (4, 16, 48), "lcr_only_256p.yaml": (4, 16, 48), "lmr_only_256p.yaml": (4, 16, 48),
               "stage1_256p.yaml": (4, 16, 48), "stage2_512p.yaml": (4, 16, 48), "tiny.yaml": (4, 4, 48),
               "tiny_wan.yaml": (4, 16, 48), "tiny_cogvideox.yaml": (4, 8, 16), "tiny_ssvae.yaml": (4, 16, 48),
               "tiny_cogvideox_shape.yaml": (4, 8, 16), "tiny_ssvae_patch2.yaml": (4, 16, 48)}


@pytest.mark.parametrize("path", VAE_CONFIGS, ids=lambda p: p.name)
def test_vae_configs_state_their_compression_and_have_it(path):
    import re

    cfg = load_config(VAETrainConfig, path, ["data.video_roots=x", "data.image_roots=y"])
    model = cfg.model
    have = (model.temporal_compression, model.spatial_compression, model.z_channels)
    assert have == COMPRESSION[path.name]
    stated = re.match(r"# Compression: (\d+)x(\d+)x(\d+) into (\d+) channels \((\d+)x\)", path.read_text())
    assert stated, f"{path.name}: the first line states the compression"
    t, h, w, c, factor = map(int, stated.groups())
    assert (t, h, c) == have and w == h
    assert factor == t * h * w * 3 // c  # RGB numbers in per latent number


@pytest.mark.parametrize("name", ["tiny.yaml", "tiny_wan.yaml", "tiny_cogvideox.yaml", "tiny_ssvae.yaml",
                                  "tiny_cogvideox_shape.yaml", "tiny_ssvae_patch2.yaml"])
def test_tiny_vae_configs_give_the_latent_shape_they_state(name):
    """The built model, not only the config arithmetic: a 9-frame clip at the training crop."""
    import torch

    from vae.train import build_vae

    cfg = load_config(VAETrainConfig, ROOT / "configs/vae" / name, ["data.video_roots=x", "data.image_roots=y"])
    t, s, c = COMPRESSION[name]
    clip = torch.zeros(1, 3, 9, cfg.data.height, cfg.data.width)
    with torch.no_grad():
        latent = build_vae(cfg).posterior(clip).mean
    assert tuple(latent.shape) == (1, c, 1 + 8 // t, cfg.data.height // s, cfg.data.width // s)
