"""The whole study at toy size: two trained VAE variants and a spectral control, two DiT seeds each, then the report
with its statistics, verdict, predictors and pictures; a re-run skips everything."""
import json
from pathlib import Path

import pytest

from infra.config import load_config
from tools.study_config import StudyConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_study(tmp_path_factory):
    import os

    from tools.study import Study

    out = tmp_path_factory.mktemp("study")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cfg = load_config(StudyConfig, "configs/study/tiny.yaml", [
            # The 4x tiny VAE: at 32 px the study's 16x one has a 2x2 latent, too small for the spectra.
            f"output_dir={out}", "seeds=[0,1]", "data.real_footage=false", "vae.config=configs/vae/tiny.yaml",
            "data.default.num_videos=12", "data.default.num_images=4", "data.default.size=32",
            "data.default.frames=5", "prompts.num_prompts=3", "reward.resamples=200",
            "measure.frames=5", "measure.size=32", "measure.stats_clips=4", "measure.num_clips=2",
            "measure.predictor_clips=16", "measure.lpips=false",
            "vae.overrides=[run.max_steps=2,run.eval_every=0,run.save_every=0,run.progress_bar=false,"
            "data.num_frames=5,data.video_batch_size=2,data.image_batch_size=2,eval.write_videos=false]",
            "t2v.overrides=[run.max_steps=2,run.eval_every=1,run.save_every=0,run.progress_bar=false,"
            "data.num_frames=5,data.height=32,data.width=32,data.video_batch_size=4,sampling.steps=2]",
            # The baseline is shown to its DiT whitened (the main job's view), the others per-channel normalised.
            "variants=[{name: baseline, view: whitened, vae_overrides: [loss.lcr.enabled=false, "
            "loss.lmr.enabled=false]},"
            "{name: lcr_lmr}, {name: checker, control: {source: lcr_lmr, kind: checkerboard, cell: 2}}]",
        ])
        study = Study(cfg, "toy")
        report = study.run()
        yield study, report, out
    finally:
        os.chdir(cwd)


def test_every_variant_and_control_is_trained_scored_and_reported(toy_study):
    study, report, out = toy_study
    stats = report["statistics"]
    assert set(stats["variants"]) == {"baseline", "lcr_lmr", "checker"}
    assert stats["seeds"] == [0, 1] and stats["prompts"] == 3 and stats["steps"] == [0, 1, 2]
    assert "vs_baseline" in stats["variants"]["checker"]
    text = Path(report["files"]["markdown"]).read_text()
    for needle in ("### Verdict", "## Predictors that need no DiT training", "VIV", "Spearman",
                   "![samples checker](samples_checker.png)", "reconstructions checker"):
        assert needle in text
    assert (out / "report" / "samples_lcr_lmr.png").stat().st_size > 5000
    # The manipulation check of every first stage, paired against the baseline on the same 3 prompt clips.
    assert "## Manipulation check" in text and "LCR raises local correlation" in text
    check = json.loads(Path(report["files"]["json"]).read_text())["manipulation_check"]
    assert check["clips"] == 3 and set(check["vaes"]) == {"baseline", "lcr_lmr", "checker"}
    assert "difference" in check["vaes"]["checker"]["lcr"] and "difference" not in check["vaes"]["baseline"]["lcr"]
    claims = {(c["vae"], c["claim"]) for c in check["expectations"]}
    assert ("lcr_lmr", "LMR raises the top-4 share") in claims and not any(v == "checker" for v, _ in claims)
    # The control's VAE is its source's, seen through the transform: no VAE of its own, the same reconstructions.
    assert not (out / "variants" / "checker" / "vae").exists()
    measures = report["measures"]
    assert measures["checker"]["reconstruction_mean"] == measures["lcr_lmr"]["reconstruction_mean"]
    assert measures["checker"]["default_data"]["psnr"] == pytest.approx(measures["lcr_lmr"]["default_data"]["psnr"])
    assert measures["checker"]["control"]["kind"] == "checkerboard"
    # Its latents (what the DiT trains on) are the source's with whole 2x2 tokens' signs flipped.
    predictors = {v: m["predictors"] for v, m in measures.items()}
    assert predictors["checker"]["low_freq_ratio"] < predictors["lcr_lmr"]["low_freq_ratio"]
    # Flipping signs per position keeps each channel's second moments but moves its mean to ~0, and the
    # eigenspectrum is of the centred covariance: close, not equal (measured 0.9% apart on CI).
    assert predictors["checker"]["effective_rank"] == pytest.approx(predictors["lcr_lmr"]["effective_rank"], rel=0.05)
    t2v = load_config(__import__("dit.train_config", fromlist=["T2VTrainConfig"]).T2VTrainConfig,
                      out / "variants" / "checker" / "seed0" / "t2v.yaml")
    assert t2v.first_stage.latent_transform.endswith("latent_transform.safetensors")
    assert t2v.latents.cache_dir == str(out / "variants" / "checker" / "latents")


def test_a_variant_shown_whitened_trains_its_dit_on_its_own_whitened_latents(toy_study):
    from dit.train_config import T2VTrainConfig
    from vae.latent_transform import load_latent_transform

    study, report, out = toy_study
    fs = out / "variants" / "baseline" / "first_stage"
    t2v = load_config(T2VTrainConfig, out / "variants" / "baseline" / "seed0" / "t2v.yaml")
    assert t2v.first_stage.path == str(fs)  # its own VAE, stored with its statistics
    assert t2v.first_stage.latent_transform == str(fs / "latent_transform.safetensors")
    assert load_latent_transform(t2v.first_stage.latent_transform).kind == "whiten"
    measures = report["measures"]
    assert measures["baseline"]["view"] == "whitened" and measures["lcr_lmr"]["view"] == "normalised"
    assert measures["baseline"]["control"] is None
    # Its DiT's latents were encoded through the transform: what the cache holds is the whitened normalised latent.
    import torch

    from dit.latent_cache import read_manifest
    from vae.first_stage import FirstStageConfig, load_first_stage

    assert read_manifest(t2v.latents.cache_dir)["first_stage"]["latent_transform"] == t2v.first_stage.latent_transform
    shown = load_first_stage(FirstStageConfig(kind="ssvae", path=str(fs),
                                              latent_transform=t2v.first_stage.latent_transform))
    normalised = load_first_stage(FirstStageConfig(kind="ssvae", path=str(fs)))
    clip = study._stats_clips(study.cfg.variant("baseline"))[:1]
    with torch.no_grad():
        whiten = load_latent_transform(t2v.first_stage.latent_transform)
        torch.testing.assert_close(shown.encode(clip), whiten(normalised.encode(clip)), atol=1e-4, rtol=1e-4)


def test_rerun_skips_every_stage_and_rewrites_the_same_report(toy_study):
    from tools.study import Study

    study, report, out = toy_study
    rerun = Study(study.cfg, "toy")
    again = rerun.run()
    assert rerun.runner.results and all(r.skipped for r in rerun.runner.results.values())
    assert again["statistics"]["variants"]["lcr_lmr"]["final"] == report["statistics"]["variants"]["lcr_lmr"]["final"]
    assert json.loads(Path(again["files"]["json"]).read_text())["statistics"]["verdict"] == \
        report["statistics"]["verdict"]
