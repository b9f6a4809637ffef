"""One validation protocol: every config error names its full dotted key exactly once, in every schema; and the
bad configs a user tried stop at start-up with the key named."""
import json
from pathlib import Path

import pytest

from infra.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
VAE, T2V, STUDY = ROOT / "configs/vae/tiny.yaml", ROOT / "configs/t2v/tiny.yaml", ROOT / "configs/study/tiny.yaml"


def _schema(path: Path):
    if path == VAE:
        from vae.train_config import VAETrainConfig
        return VAETrainConfig
    if path == T2V:
        from dit.train_config import T2VTrainConfig
        return T2VTrainConfig
    from tools.study_config import StudyConfig
    return StudyConfig


@pytest.mark.parametrize("path, overrides, key", [
    (VAE, ["model.encoder.ch_mult=[1,2]"], "model.encoder.temporal_downsample"),
    (VAE, ["model.decoder.z_channels=24"], "model.decoder.z_channels"),
    (VAE, ["model.encoder.ch=8"], "model.encoder.boundary_shortcuts"),
    (VAE, ["data.num_frames=8"], "data.num_frames"),
    (VAE, ["data.height=50"], "data.height"),  # not a multiple of the model's compression: at start-up, not mid-run
    (VAE, ["data.buckets=[{frames: 8, height: 32, width: 32, batch_size: 1}]"], "data.buckets[0].frames"),
    (VAE, ["loss.lmr.mask_ratios=[0.0,1.5]"], "loss.lmr.mask_ratios"),
    # 32 px crops and the PatchGAN's default 16x down-sampling: at start-up, not when the GAN starts (a user's run)
    (VAE, ["loss.disc_weight=1.0"], "loss.discriminator.max_spatial_down"),
    (VAE, ["loss.lcr.thresh=2.0"], "loss.lcr.thresh"),
    (VAE, ["perceptual.net=squeeze"], "perceptual.net"),
    (VAE, ["optimizer.min_lr=1.0"], "optimizer.min_lr"),
    (T2V, ["diffusion.schedule.snr_shift_scale=0"], "diffusion.schedule.snr_shift_scale"),
    (T2V, ["model.overrides={num_layers: 0}"], "model.overrides.num_layers"),
    (T2V, ["model.overrides={num_layerz: 2}"], "model.overrides"),
    (T2V, ["text_encoder.max_length=0"], "text_encoder.max_length"),
    (T2V, ["first_stage.kind=mystery"], "first_stage.kind"),
    (T2V, ["first_stage.dtype=int8"], "first_stage.dtype"),
    (T2V, ["sampling.guidance=0.5"], "sampling.guidance"),
    (STUDY, ["data.default.max_radius=0.4"], "data.default.min_radius/max_radius"),
    (STUDY, ["data.default.colors=[red,mauve]"], "data.default.colors"),
    (STUDY, ["reward.unified.num_frames=0"], "reward.unified.num_frames"),
    (STUDY, ["measure.frames=8"], "measure.frames"),
])
def test_every_error_names_its_full_key_exactly_once(path, overrides, key, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as err:
        load_config(_schema(path), path, overrides)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}:"), message
    leaf = key.rsplit(".", 1)[-1]
    assert message.count(f"{key}:") == 1 and f".{leaf}.{leaf}" not in message, message


def test_an_empty_override_means_an_empty_string_or_none():
    from dit.train_config import T2VTrainConfig

    cfg = load_config(T2VTrainConfig, T2V, ["latents.cache_dir=", "first_stage.tile_size="])
    assert cfg.latents.cache_dir == "" and not cfg.latents.cached and cfg.first_stage.tile_size is None
    with pytest.raises(ConfigError, match="run.max_steps"):
        load_config(T2VTrainConfig, T2V, ["run.max_steps="])


def _t2v_task(tmp_path, *overrides):
    import torch

    from dit.train import T2VTask
    from dit.train_config import T2VTrainConfig
    from infra.distributed import DistInfo

    cfg = load_config(T2VTrainConfig, T2V, [f"run.output_dir={tmp_path / 'run'}", *overrides])
    return T2VTask(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def test_a_missing_first_stage_is_named_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"^first_stage\.path: .*nowhere is not a folder"):
        _t2v_task(tmp_path, f"first_stage.path={tmp_path / 'nowhere'}")


def test_a_cache_of_other_clips_is_refused_naming_the_data_key(tmp_path):
    from dit.latent_cache import COMPLETE, MANIFEST
    from dit.train import check_cache_matches
    from dit.train_config import T2VTrainConfig

    stage = tmp_path / "vae"
    stage.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / MANIFEST).write_text(json.dumps({
        "clip": {"frames": 9, "height": 64, "width": 64, "fps": 8.0},
        "first_stage": {"kind": "ssvae", "path": str(stage), "latent_transform": ""}}))
    (cache / COMPLETE).write_text("{}")
    common = [f"first_stage.path={stage}", f"latents.cache_dir={cache}"]
    check_cache_matches(load_config(T2VTrainConfig, T2V, common), cache)  # the same clips: accepted
    with pytest.raises(ConfigError, match=r"^data\.height: 48, but the latent cache .* 9 frames of 64x64"):
        check_cache_matches(load_config(T2VTrainConfig, T2V, [*common, "data.height=48"]), cache)
    with pytest.raises(ConfigError, match=r"^latents\.cache_dir: .* was made with first stage"):
        check_cache_matches(load_config(T2VTrainConfig, T2V, [*common, f"first_stage.path={tmp_path}"]), cache)
    # A cache without log-variances (no "posterior": an older or a transformed cache) cannot be sampled.
    with pytest.raises(ConfigError, match=r"^latents\.sample: .* holds posterior means only"):
        check_cache_matches(load_config(T2VTrainConfig, T2V, [*common, "latents.sample=true"]), cache)
    with pytest.raises(ConfigError, match=r"latents\.cache_root: give latents\.cache_dir .* not both"):
        load_config(T2VTrainConfig, T2V, [*common, f"latents.cache_root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"latents\.sample: draws from a cached posterior"):
        load_config(T2VTrainConfig, T2V, [f"first_stage.path={stage}", "latents.sample=true"])


def test_clips_the_first_stage_cannot_take_are_named():
    import types

    from dit.train import check_clip_geometry
    from dit.train_config import T2VTrainConfig

    stage = types.SimpleNamespace(spatial_compression=4, temporal_compression=4)
    check_clip_geometry(load_config(T2VTrainConfig, T2V), stage)
    with pytest.raises(ConfigError, match=r"^data\.height: must be a multiple of the first stage's spatial"):
        check_clip_geometry(load_config(T2VTrainConfig, T2V, ["data.height=50"]), stage)
    with pytest.raises(ConfigError, match=r"^sampling\.num_frames: must be 1 \+ 8k"):
        check_clip_geometry(load_config(T2VTrainConfig, T2V, ["sampling.num_frames=5", "data.num_frames=9"]),
                            types.SimpleNamespace(spatial_compression=4, temporal_compression=8))


def test_deepspeed_refusing_its_section_names_deepspeed_extra(one_process_group):
    import torch

    from infra.config import DeepSpeedConfig, OptimizerConfig
    from infra.engine import build_engine

    bad = DeepSpeedConfig(extra={"zero_optimization": {"stage": 2, "reduce_bucket_size": "lots"}})
    with pytest.raises(ConfigError, match=r"^deepspeed\.extra: .*reduce_bucket_size"):
        build_engine(torch.nn.Linear(2, 2), bad, OptimizerConfig(), 1)


def test_a_zero_engine_builds_without_importing_deepspeeds_muon(one_process_group, monkeypatch):
    """DeepSpeed's ZeRO check would import its Muon module (whose torch.compile decorators cost 2.2 s of a process's
    start-up); a ZeRO-2 engine is built and steps without it, with the AdamW asked for, and Muon stays importable."""
    import sys

    import torch

    from infra.config import DeepSpeedConfig, OptimizerConfig
    from infra.engine import _MUON_MODULE, build_engine

    monkeypatch.delitem(sys.modules, _MUON_MODULE, raising=False)  # put back afterwards if another test imported it
    engine = build_engine(torch.nn.Linear(2, 2), DeepSpeedConfig(zero_stage=2), OptimizerConfig(type="adamw"), 1)
    assert _MUON_MODULE not in sys.modules  # neither imported nor left marked as unimportable
    assert type(engine.optimizer.optimizer).__name__ == "AdamW"
    loss = engine(torch.ones(1, 2)).sum()
    engine.backward(loss)
    engine.step()
    # ZeRO-3 builds its optimizer with an unconditional Muon import, so there it is left alone.
    build_engine(torch.nn.Linear(2, 2), DeepSpeedConfig(zero_stage=3), OptimizerConfig(type="adamw"), 1)
