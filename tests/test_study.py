"""The convergence study: resumable stages, the report's numbers on constructed curves, config validation."""
import json
import math
from pathlib import Path

import pytest

from infra.config import ConfigError, load_config
from tools.stages import StageRunner, config_hash
from tools.study_config import StudyConfig, VariantConfig
from tools.study_report import mean_curve, reward_summary, steps_to_threshold, write_report

# ------------------------------------------------------------------------------------------------------- stages


def test_stage_runs_once_then_is_skipped(tmp_path):
    calls = []

    def work():
        calls.append(1)
        return {"value": len(calls)}

    runner = StageRunner(tmp_path / "stages")
    first = runner.run("a/train", {"lr": 1}, work)
    again = StageRunner(tmp_path / "stages").run("a/train", {"lr": 1}, work)  # a fresh process, same folder
    assert calls == [1]
    assert not first.skipped and again.skipped
    assert again.outputs == {"value": 1} and again.hash == first.hash
    marker = json.loads((tmp_path / "stages" / "a__train.json").read_text())
    assert marker["status"] == "done" and marker["config"] == {"lr": 1}


def test_changed_config_reruns_and_cleans(tmp_path):
    out = tmp_path / "run"
    runner = StageRunner(tmp_path / "stages")

    def work():
        out.mkdir(exist_ok=True)
        stale = (out / "checkpoint").is_file()
        (out / "checkpoint").write_text("x")
        return {"found_stale_checkpoint": stale}

    runner.run("train", {"lr": 1}, work, clean=[out])
    second = runner.run("train", {"lr": 2}, work, clean=[out])
    assert not second.skipped
    assert second.outputs == {"found_stale_checkpoint": False}  # the old run's files were removed first
    assert runner.run("train", {"lr": 2}, work, clean=[out]).skipped


def test_interrupted_stage_reruns_without_cleaning(tmp_path):
    out = tmp_path / "run"
    runner = StageRunner(tmp_path / "stages")

    def crash():
        out.mkdir()
        (out / "checkpoint").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run("train", {"lr": 1}, crash, clean=[out])
    assert runner.read_marker("train")["status"] == "running"
    # Same config: the training's own resume must find its checkpoint.
    result = runner.run("train", {"lr": 1}, lambda: {"resumed": (out / "checkpoint").is_file()}, clean=[out])
    assert result.outputs == {"resumed": True}


def test_config_hash_ignores_key_order_but_not_values():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_stage_must_return_a_dict(tmp_path):
    with pytest.raises(TypeError, match="must return a dict"):
        StageRunner(tmp_path).run("x", {}, lambda: [1])


# ------------------------------------------------------------------------------------------------------ report
def _curve(values, every=10):
    return [((i + 1) * every, v) for i, v in enumerate(values)]


def test_steps_to_threshold_first_step_reaching_it():
    curve = _curve([0.1, 0.3, 0.5, 0.4, 0.6])
    assert steps_to_threshold(curve, 0.5) == 30
    assert steps_to_threshold(curve, 0.3) == 20
    assert steps_to_threshold(curve, 0.7) is None


def test_speed_up_relative_gain_and_never_reaching():
    curves = {
        "baseline": {0: _curve([0.1, 0.2, 0.3, 0.4, 0.5])},  # reaches 0.4 at step 40
        "fast": {0: _curve([0.2, 0.45, 0.5, 0.55, 0.6])},  # reaches 0.4 at step 20
        "never": {0: _curve([0.1, 0.1, 0.2, 0.2, 0.3])},
    }
    s = reward_summary(curves, "baseline", threshold=0.4)
    v = s["variants"]
    assert s["threshold"] == 0.4
    assert v["baseline"]["steps_to_threshold"] == 40 and v["baseline"]["speed_up"] == pytest.approx(1.0)
    assert v["fast"]["steps_to_threshold"] == 20 and v["fast"]["speed_up"] == pytest.approx(2.0)
    assert v["fast"]["relative_gain"] == pytest.approx(0.1 / 0.5)
    assert v["never"]["steps_to_threshold"] is None and v["never"]["speed_up"] is None
    assert v["never"]["relative_gain"] == pytest.approx(-0.4)
    assert v["never"]["seeds_reaching"] == 0


def test_threshold_from_baseline_final_and_lower_bound_when_baseline_never_reaches():
    curves = {"baseline": {0: _curve([0.1, 0.2, 0.2, 0.3, 0.4])}, "fast": {0: _curve([0.3, 0.38, 0.5, 0.5, 0.5])}}
    s = reward_summary(curves, "baseline", threshold=0.0, fraction=0.9)
    assert s["threshold"] == pytest.approx(0.36)
    assert s["variants"]["fast"]["steps_to_threshold"] == 20
    assert s["variants"]["fast"]["speed_up"] == pytest.approx(50 / 20)

    s = reward_summary(curves, "baseline", threshold=0.45)  # baseline never gets there
    fast = s["variants"]["fast"]
    assert s["variants"]["baseline"]["steps_to_threshold"] is None
    assert fast["speed_up"] == pytest.approx(50 / 30) and fast["speed_up_lower_bound"]


def test_all_zero_rewards_give_no_threshold_crossing():
    curves = {"baseline": {0: _curve([0.0, 0.0])}, "lcr": {0: _curve([0.0, 0.0])}}
    s = reward_summary(curves, "baseline", threshold=0.0)
    assert s["threshold"] == 0.0 and s["note"]
    assert all(v["steps_to_threshold"] is None and v["speed_up"] is None for v in s["variants"].values())


def test_several_seeds_mean_curve_and_spread():
    curves = {
        "baseline": {0: _curve([0.1, 0.3, 0.5]), 1: _curve([0.1, 0.5, 0.5]), 2: _curve([0.1, 0.2, 0.4])},
        "lcr": {0: _curve([0.5, 0.5, 0.6]), 1: _curve([0.3, 0.5, 0.7]), 2: _curve([0.5, 0.6, 0.5])},
    }
    assert mean_curve(list(curves["baseline"].values())) == [(10, pytest.approx(0.1)), (20, pytest.approx(1 / 3)),
                                                            (30, pytest.approx(1.4 / 3))]
    s = reward_summary(curves, "baseline", threshold=0.45)
    base, lcr = s["variants"]["baseline"], s["variants"]["lcr"]
    assert base["steps_to_threshold"] == 30  # mean curve 0.1, 0.33, 0.47
    assert lcr["steps_to_threshold"] == 20  # mean curve 0.433, 0.533, 0.6
    assert lcr["speed_up"] == pytest.approx(1.5)
    # per seed: baseline reaches at 30, 20, never; lcr at 10, 20, 10
    assert base["steps_per_seed"] == {"0": 30, "1": 20, "2": None}
    assert base["seeds_reaching"] == 2 and lcr["seeds_reaching"] == 3
    assert lcr["speed_up_per_seed"]["0"] == pytest.approx(3.0)
    assert lcr["speed_up_per_seed"]["1"] == pytest.approx(1.0)
    assert lcr["speed_up_per_seed"]["2"] == pytest.approx(3.0)  # baseline seed 2 never reaches: lower bound 30/10
    spread = lcr["final"]
    assert spread["n"] == 3 and spread["mean"] == pytest.approx(0.6)
    assert spread["std"] == pytest.approx(0.1) and spread["min"] == 0.5 and spread["max"] == 0.7


def test_mean_curve_uses_common_steps_only():
    assert mean_curve([[(10, 0.2), (20, 0.4)], [(10, 0.4)]]) == [(10, pytest.approx(0.3))]


def test_report_files(tmp_path):
    curves = {"baseline": {0: _curve([0.1, 0.4]), 1: _curve([0.2, 0.3])}, "lcr_lmr": {0: _curve([0.3, 0.6]),
                                                                                      1: _curve([0.4, 0.5])}}
    s = reward_summary(curves, "baseline", threshold=0.3)
    measures = {v: {"reconstruction_mean": {"psnr": 20.0, "ssim": 0.5, "lpips": 0.3},
                    "spectral": {"low_freq_ratio": 2.0, "effective_rank": 10.0, "top_4_share": 0.6}} for v in curves}
    files = write_report(tmp_path, "t", s, curves, measures, {"baseline": {"vae": 10.0, "dit": 5.0}})
    text = files["markdown"].read_text()
    assert "| lcr_lmr | 10 (per seed 10 ± 0 (n=2)) | 2.00x" in text and "+57.1 %" in text
    assert json.loads(files["json"].read_text())["summary"]["variants"]["lcr_lmr"]["speed_up"] == 2.0
    assert files["plot"].stat().st_size > 1000


def test_reward_plot_draws_the_chance_level(tmp_path, monkeypatch):
    import matplotlib.axes

    lines = []
    original = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline",
                        lambda self, y=0, *a, **k: lines.append((y, k.get("label"))) or original(self, y, *a, **k))
    curves = {"baseline": {0: _curve([0.1, 0.4])}}
    measures = {"baseline": {"chance": 0.28}}
    write_report(tmp_path, "t", reward_summary(curves, "baseline", threshold=0.3), curves, measures, {})
    assert (0.28, "chance 0.280") in lines and (0.3, "threshold 0.300") in lines


# ------------------------------------------------------------------------------------------------------ config
def _study_yaml(tmp_path, text: str):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


BASE = """
vae: {config: configs/vae/tiny.yaml}
t2v: {config: configs/t2v/tiny.yaml}
variants: [{name: baseline}, {name: lcr_lmr}]
"""


@pytest.mark.parametrize("extra, key", [
    ("baseline: nope\n", "baseline"),
    ("seeds: [0, 0]\n", "seeds"),
    ("reward: {kind: clip}\n", "reward.kind"),
    ("measure: {frames: 8}\n", "measure.frames"),
    ("launcher: {kind: mpirun}\n", "launcher.kind"),
    ("data: {heldout_clips: [nowhere]}\n", "data.heldout_clips"),
    ("prompts: {seed: 0}\n", "prompts.seed"),
    ("reward: {treshold: 0.5}\n", "reward.treshold"),
])
def test_config_errors_name_the_key(tmp_path, monkeypatch, extra, key):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    path = _study_yaml(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as err:
        load_config(StudyConfig, path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_variant_errors_name_the_key(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    from tools.study import Study

    # A wan variant without a folder is trained here, so its VAE config must train model.kind wan.
    bad_kind = _study_yaml(tmp_path, BASE.replace("{name: lcr_lmr}", "{name: wan, kind: wan}"))
    with pytest.raises(ConfigError, match=r"variants\[1\]\.kind: 'wan', but its VAE trains model\.kind 'ssvae'"):
        Study(load_config(StudyConfig, bad_kind), str(bad_kind))


def test_bad_variant_override_fails_before_anything_runs(tmp_path, monkeypatch):
    from pathlib import Path

    from tools.study import Study

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    path = _study_yaml(tmp_path, BASE.replace("{name: lcr_lmr}", "{name: lcr_lmr, vae_overrides: [loss.lcr.wieght=1]}")
                       + f"output_dir: {tmp_path / 'out'}\n")
    cfg = load_config(StudyConfig, path)
    with pytest.raises(ConfigError, match=r"lcr_lmr.*loss\.lcr\.wieght"):
        Study(cfg, str(path))
    assert not (tmp_path / "out").exists()


def test_child_configs_are_built_whole_and_checked_before_anything_runs(tmp_path, monkeypatch):
    from pathlib import Path

    from tools.study import Study

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    # Images are not in a latent cache: before, this passed the up-front check and failed in the DiT's process.
    cfg = load_config(StudyConfig, "configs/study/tiny.yaml", [f"output_dir={tmp_path / 'out'}", "seeds=[3]",
                                                               "t2v.overrides=[data.image_prob=0.5,data.image_roots=x]"])
    with pytest.raises(ConfigError, match=r"variant baseline \(t2v\).*data\.image_prob"):
        Study(cfg, "s")
    cfg = load_config(StudyConfig, "configs/study/tiny.yaml", [f"output_dir={tmp_path / 'out'}", "seeds=[3]"])
    study = Study(cfg, "s")
    assert not (tmp_path / "out").exists()
    checker = study.t2v_configs[("lcr_lmr_checker", 3)]
    assert checker.run.seed == 3 and checker.first_stage.path == str(tmp_path / "out/variants/lcr_lmr/first_stage")
    assert checker.first_stage.latent_transform.endswith("lcr_lmr_checker/first_stage/latent_transform.safetensors")
    assert checker.latents.cache_dir == str(tmp_path / "out/variants/lcr_lmr_checker/latents")
    assert len(checker.sampling.prompts) == cfg.prompts.num_prompts
    # The study fixes its own folders: an override cannot move a run out of its layout.
    cfg = load_config(StudyConfig, "configs/study/tiny.yaml", [f"output_dir={tmp_path / 'out'}",
                                                               "vae.overrides=[run.output_dir=/elsewhere]"])
    assert Study(cfg, "s").vae_configs["lcr"].run.output_dir == str(tmp_path / "out/variants/lcr/vae")


def test_shipped_study_configs_validate(monkeypatch):
    from pathlib import Path

    from tools.study import Study

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    for name in ("configs/study/tiny.yaml", "configs/study/tiny_4x.yaml", "configs/pipeline/tiny.yaml"):
        cfg = load_config(StudyConfig, name)
        study = Study(cfg, name)
        vae = study.vae_config(cfg.variants[-1])
        assert str(study.data / "default") in vae.data.video_roots
        # The DiT's reward is measured at 6 or more points of training, the last one at its final step.
        run = study.t2v_config(cfg.variants[0], cfg.seeds[0]).run
        assert run.max_steps % run.eval_every == 0, name
        assert run.eval_at_start + run.max_steps // run.eval_every >= 6, name
    # The main job: one SSVAE at the released latent shape, its DiT shown the latents whitened, 48 tokens a clip.
    main = load_config(StudyConfig, "configs/pipeline/tiny.yaml")
    study = Study(main, "main")
    (variant,) = main.variants
    model = study.vae_config(variant).model
    assert (model.temporal_compression, model.spatial_compression, model.z_channels) == (4, 16, 48)
    assert variant.view == "whitened"
    t2v = study.t2v_config(variant, main.seeds[0])
    assert t2v.first_stage.latent_transform.endswith("ssvae/first_stage/latent_transform.safetensors")
    assert 3 * (t2v.data.height // 16 // t2v.model.patch_size) ** 2 == 48
    tiny = load_config(StudyConfig, "configs/study/tiny.yaml")
    assert [v.name for v in tiny.variants] == ["baseline", "lcr", "lmr", "lcr_lmr", "cogvideox_shape",
                                               "baseline_white", "lcr_lmr_white", "lcr_lmr_checker"]
    study = Study(tiny, "tiny")
    flags = {v.name: (study.vae_config(v).loss.lcr.enabled, study.vae_config(v).loss.lmr.enabled)
             for v in tiny.variants if v.trains_vae}
    assert flags == {"baseline": (False, False), "lcr": (True, False), "lmr": (False, True), "lcr_lmr": (True, True),
                     "cogvideox_shape": (False, False)}
    # The paper's latent shapes (time, space, channels), each DiT at 48 tokens per 9-frame 128 px clip.
    shapes = {v.name: (c.model.temporal_compression, c.model.spatial_compression, c.model.z_channels)
              for v in tiny.variants if v.trains_vae for c in [study.vae_config(v)]}
    assert shapes == {**{n: (4, 16, 48) for n in ("baseline", "lcr", "lmr", "lcr_lmr")}, "cogvideox_shape": (4, 8, 16)}
    for v in tiny.variants:
        t2v = study.t2v_config(v, 0)
        source = v.control.source if v.is_control else v.name
        tokens = 3 * (t2v.data.height // shapes[source][1] // t2v.model.patch_size) ** 2
        assert tokens == 48, v.name
    # The 2x2 of controls: baseline and LCR+LMR, each normalised (the trained variant itself) and whitened.
    controls = {v.name: (v.control.source, v.control.kind) for v in tiny.variants if v.is_control}
    assert controls == {"baseline_white": ("baseline", "whiten"), "lcr_lmr_white": ("lcr_lmr", "whiten"),
                        "lcr_lmr_checker": ("lcr_lmr", "checkerboard")}
    assert tiny.whitened_controls() == {"baseline": "baseline_white", "lcr_lmr": "lcr_lmr_white"}
    checker = tiny.variant("lcr_lmr_checker")
    assert checker.control.cell == study.t2v_config(checker, 0).model.patch_size  # whole tokens flip sign
    assert [v.name for v in study.ordered_variants()][-3:] == ["baseline_white", "lcr_lmr_white", "lcr_lmr_checker"]
    assert len(tiny.seeds) >= 3 and tiny.prompts.num_prompts >= 32
    assert not math.isnan(tiny.reward.threshold_fraction)


@pytest.mark.parametrize("variant, key", [
    ("{name: c, control: {source: nowhere, kind: whiten}}", r"variants\[2\]\.control\.source"),
    ("{name: c, control: {source: lcr_lmr, kind: blur}}", r"variants\[2\]\.control\.kind"),
    ("{name: c, path: /tmp, control: {source: lcr_lmr, kind: whiten}}", r"variants\[2\]\.control"),
    ("{name: c, control: {source: lcr_lmr}}", r"variants\[2\]\.control\.kind"),
    ("{name: c, view: white}", r"variants\[2\]\.view"),
    ("{name: c, view: whitened, control: {source: lcr_lmr, kind: checkerboard}}", r"variants\[2\]\.view"),
    ("{name: c, view: whitened}, {name: d, control: {source: c, kind: whiten}}", r"variants\[3\]\.control\.source"),
])
def test_control_errors_name_the_key(tmp_path, monkeypatch, variant, key):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    path = _study_yaml(tmp_path, BASE.replace("{name: lcr_lmr}]", "{name: lcr_lmr}, " + variant + "]"))
    with pytest.raises(ConfigError, match=key):
        load_config(StudyConfig, path)


def _data_only_study(tmp_path, monkeypatch, *overrides):
    """The tiny study in ``tmp_path`` with no real footage and a few videos, its data made."""
    from pathlib import Path

    from tools.study import Study

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cfg = load_config(StudyConfig, "configs/study/tiny.yaml", [
        f"output_dir={tmp_path}", "data.real_footage=false", "data.default.num_images=0", *overrides])
    study = Study(cfg, "t")
    study.stage_data()
    return study


def test_default_data_scene_options_reach_the_generated_set(tmp_path, monkeypatch):
    study = _data_only_study(tmp_path, monkeypatch, "data.default.num_videos=3", "data.default.size=32",
                             "data.default.frames=5", "prompts.num_prompts=2", "data.default.colors=[red,blue]",
                             "data.default.motions=[left]", "data.default.seed=7", "prompts.seed=1234")
    # The sizes and seeds in the config are the ones the sets were made with, and the prompts are their captions.
    default = json.loads((tmp_path / "data" / "default" / "manifest.json").read_text())
    prompts = json.loads((tmp_path / "data" / "prompts" / "manifest.json").read_text())
    assert (default["num_videos"], default["seed"], default["config"]["frames"]) == (3, 7, 5)
    assert (prompts["num_videos"], prompts["num_images"], prompts["seed"]) == (2, 0, 1234)
    captions, truths = study.prompts()
    assert len(captions) == len(truths) == 2
    t2v = study.t2v_configs[(study.cfg.variants[0].name, 0)]
    assert t2v.data.video_roots == str(tmp_path / "data" / "default")
    assert t2v.sampling.prompts == captions  # the configs were built with the captions the prompt set holds
    for folder in ("default", "prompts"):
        truths = [json.loads(line)["truth"] for meta in sorted((tmp_path / "data" / folder).glob("*.meta.jsonl"))
                  for line in meta.read_text().splitlines()]
        assert truths and {t["color"] for t in truths} <= {"red", "blue"} and {t["motion"] for t in truths} == {"left"}
    with pytest.raises(ConfigError, match=r"data\.default\.min_radius/max_radius"):
        load_config(StudyConfig, "configs/study/tiny.yaml", ["data.default.max_radius=0.4"])


@pytest.mark.parametrize("weight, suffix", [(1, ""), (20, "*20")])
def test_real_weight_reaches_the_vae_data_roots(tmp_path, monkeypatch, weight, suffix):
    from tools.study import Study

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cfg = load_config(StudyConfig, "configs/study/tiny.yaml", [f"output_dir={tmp_path}", f"data.real_weight={weight}"])
    roots = Study(cfg, "t").vae_configs["baseline"].data.video_roots
    assert roots == f"{tmp_path / 'data' / 'default'},{tmp_path / 'data' / 'real_train'}{suffix}"
    with pytest.raises(ConfigError, match=r"data\.real_weight"):
        load_config(StudyConfig, "configs/study/tiny.yaml", ["data.real_weight=0"])


class _Identity(__import__("torch").nn.Module):
    """A first stage whose latents are the clip itself (or, ``blank``, decode to grey)."""

    spatial_compression = temporal_compression = 1

    def __init__(self, blank: bool = False):
        import torch

        super().__init__()
        self.blank = blank
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode(self, video):
        return video

    def decode(self, latents):
        return latents * 0 if self.blank else latents


def test_prompt_reconstructions_bound_what_samples_can_score(tmp_path, monkeypatch):
    from tools.study_report import markdown_tables

    study = _data_only_study(tmp_path, monkeypatch, "data.default.num_videos=1", "data.default.size=64",
                             "data.default.frames=9", "prompts.num_prompts=3", "measure.frames=9", "measure.size=64")
    perfect_run = study._prompt_reconstructions(_Identity(), tmp_path / "grid.png")
    blank_run = study._prompt_reconstructions(_Identity(blank=True))
    assert perfect_run["psnr"] == 100.0 and blank_run["psnr"] < 15  # held-out default data, identity vs grey
    assert perfect_run["pooling_psnr"]["16x"] < perfect_run["pooling_psnr"]["1x"] == 100.0
    assert (tmp_path / "grid.png").stat().st_size > 5000  # original | reconstruction frames of the prompt clips
    perfect, blank = perfect_run["reward"], blank_run["reward"]
    assert perfect["clips"] == 3 and perfect["original"] > 0.8 and perfect["mean"] == perfect["original"]
    assert blank["mean"] == 0.0 and blank["original"] == perfect["original"]
    summary = reward_summary({"a": {0: _curve([0.0, 0.0])}, "b": {0: _curve([0.0, 0.1])}}, "a")
    text = markdown_tables(summary, {"a": {"reconstruction_reward": perfect}, "b": {"reconstruction_reward": blank}}, {})
    assert "rec. reward" in text and f"| {perfect['mean']:.3f} |" in text
    assert "**b: the VAE's own reconstructions score under half" in text


def test_reconstruction_targets_compare_with_the_pool_and_the_originals():
    from tools.study_report import reconstruction_targets

    def measure(default, real, reward):
        return {"default_data": {"psnr": default, "pooling_psnr": {"16x": 22.5},
                                 "real_footage": {"psnr": real, "pooling_psnr": {"16x": 16.5}}},
                "reconstruction_reward": {"mean": reward, "original": 0.95}}

    lines = reconstruction_targets({"good": measure(24.5, 16.5, 0.9), "bad": measure(24.0, 16.4, 0.8), "none": {}})
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "variant" not in line}
    assert rows["good"].count("yes") == 3 and "**no**" not in rows["good"]  # targets met exactly count as met
    assert rows["bad"].count("**no**") == 3 and "(+1.50)" in rows["bad"] and "(-0.10)" in rows["bad"]
    assert rows["none"] == "| none | - | - | - |"


@pytest.mark.parametrize("launcher, match", [
    ("launcher: {parallel_runs: 0}\n", "launcher.parallel_runs"),
    ("launcher: {omp_threads: 2, parallel_runs: 3}\n", "launcher.parallel_runs"),
])
def test_parallel_runs_errors_name_the_key(tmp_path, monkeypatch, launcher, match):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        load_config(StudyConfig, _study_yaml(tmp_path, BASE + launcher))


def test_parallel_runs_split_the_threads():
    from tools.study_config import LauncherConfig

    assert LauncherConfig(omp_threads=2, parallel_runs=2).threads_per_run(2) == 1
    assert LauncherConfig(omp_threads=8, parallel_runs=3).threads_per_run(3) == 2
    # A run alone (a VAE training, or the last DiT) keeps every thread.
    assert LauncherConfig(omp_threads=2, parallel_runs=2).threads_per_run(1) == 2
    assert LauncherConfig(omp_threads=0).threads_per_run(1) == 0


def _dit_pool_study(tmp_path, monkeypatch, parallel_runs, fail=None):
    """A Study whose DiT stage only records when each (variant, seed) ran, in how many threads, and may fail."""
    import threading
    import time
    from pathlib import Path

    from tools.study import Study

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cfg = load_config(StudyConfig, "configs/study/tiny.yaml", [f"output_dir={tmp_path / 'out'}", "seeds=[0,1,2]",
                                                               f"launcher.parallel_runs={parallel_runs}"])
    study = Study(cfg, "s")
    lock, log, running = threading.Lock(), [], [0]

    def fake_dit(variant, seed, first_stage, latents, runs_at_once=1):
        with lock:
            running[0] += 1
            log.append(("start", variant.name, seed, running[0], cfg.launcher.threads_per_run(runs_at_once)))
        time.sleep(0.05)
        with lock:
            running[0] -= 1
            log.append(("end", variant.name, seed))
        if (variant.name, seed) == fail:
            raise RuntimeError(f"{variant.name} seed {seed} failed")
        return f"{variant.name}/{seed}"

    monkeypatch.setattr(study, "stage_dit", fake_dit)
    jobs = [(v, s) for v in study.ordered_variants()[:2] for s in cfg.seeds]
    done = {v.name: {"first_stage": None, "latents": None} for v, _ in jobs}
    return study, jobs, done, log


def test_dit_trainings_run_parallel_runs_at_once_each_with_its_share_of_threads(tmp_path, monkeypatch):
    from tqdm import tqdm

    study, jobs, done, log = _dit_pool_study(tmp_path, monkeypatch, parallel_runs=2)
    with tqdm(total=len(jobs), disable=True) as bar:
        results = study._train_dits(jobs, done, bar)
    assert results == {(v.name, s): f"{v.name}/{s}" for v, s in jobs}
    starts = [row for row in log if row[0] == "start"]
    assert len(starts) == 6 and max(row[3] for row in starts) == 2 and {row[4] for row in starts} == {1}
    study, jobs, done, log = _dit_pool_study(tmp_path, monkeypatch, parallel_runs=1)
    with tqdm(total=len(jobs), disable=True) as bar:
        study._train_dits(jobs, done, bar)
    assert max(row[3] for row in log if row[0] == "start") == 1
    assert {row[4] for row in log if row[0] == "start"} == {2}


def test_a_failed_dit_training_lets_the_running_one_finish_starts_no_more_and_is_raised(tmp_path, monkeypatch):
    from tqdm import tqdm

    study, jobs, done, log = _dit_pool_study(tmp_path, monkeypatch, parallel_runs=2, fail=("baseline", 0))
    with tqdm(total=len(jobs), disable=True) as bar, pytest.raises(RuntimeError, match="baseline seed 0 failed"):
        study._train_dits(jobs, done, bar)
    started = {(row[1], row[2]) for row in log if row[0] == "start"}
    ended = {(row[1], row[2]) for row in log if row[0] == "end"}
    assert started == ended  # nothing left running
    assert len(started) < len(jobs)  # the queued ones were not started


def test_vae_trainings_run_parallel_runs_at_once_for_every_variant_that_owns_a_first_stage(tmp_path, monkeypatch):
    """The study trains its VAEs in the same pool as its DiTs: every non-control variant once, two at a time with
    one thread each on a 2-thread launcher; the controls train nothing, and a VAE given by path takes no slot."""
    import io
    import threading
    import time
    from pathlib import Path

    from tqdm import tqdm

    from tools.study import Study

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cfg = load_config(StudyConfig, "configs/study/tiny.yaml", [f"output_dir={tmp_path / 'out'}"])
    assert cfg.launcher.parallel_runs == 2 and cfg.launcher.omp_threads == 2
    (tmp_path / "given").mkdir()
    cfg.variants.insert(1, VariantConfig(name="given", path=str(tmp_path / "given")))
    study = Study(cfg, "s")
    lock, starts, running = threading.Lock(), [], [0]

    def fake_vae(variant, data_hash, runs_at_once=1):
        with lock:
            running[0] += 1
            starts.append((variant.name, data_hash, running[0], cfg.launcher.threads_per_run(runs_at_once)))
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return f"vae of {variant.name}"

    monkeypatch.setattr(study, "stage_vae", fake_vae)
    with tqdm(file=io.StringIO()) as bar:
        results = study._train_vaes("hash", bar)
        assert bar.n == 6  # one step per VAE stage
    owners = [v.name for v in cfg.variants if not v.is_control]
    assert owners == ["baseline", "given", "lcr", "lmr", "lcr_lmr", "cogvideox_shape"]
    assert results == {name: f"vae of {name}" for name in owners}
    assert sorted(row[0] for row in starts) == sorted(owners) and {row[1] for row in starts} == {"hash"}
    # The given VAE ran outside the pool (called with the default runs_at_once=1, so all threads).
    assert [row[3] for row in starts if row[0] == "given"] == [2]
    trained = [row for row in starts if row[0] != "given"]
    assert max(row[2] for row in trained) == 2 and {row[3] for row in trained} == {1}


def test_pooling_baseline_reproduces_what_is_constant_over_its_blocks_and_loses_the_rest():
    """The report's pooling baselines on a constructed clip: a clip constant over 16x16 blocks is what a 16x pool
    keeps exactly; a 1-pixel checkerboard on top is lost at every pooling size and kept at 1."""
    import torch

    from infra.metrics.image_quality import psnr
    from tools.study import _block_means

    blocks = torch.rand(1, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    clip = blocks.repeat_interleave(16, dim=3).repeat_interleave(16, dim=4)  # 64x64 frames
    torch.testing.assert_close(_block_means(clip, 16), clip)
    torch.testing.assert_close(_block_means(clip, 8), clip)
    checker = ((torch.arange(64).view(-1, 1) + torch.arange(64)) % 2 * 2 - 1).float() * 0.1
    detailed = clip + checker
    for k in (2, 8, 16):
        torch.testing.assert_close(_block_means(detailed, k), clip)
    # An error of 0.1 everywhere on the [-1, 1] range: 20 log10(2 / 0.1) = 26.02 dB.
    assert float(psnr(_block_means(detailed, 16), detailed).mean()) == pytest.approx(26.02, abs=0.01)


def test_the_manipulation_check_hinge_is_the_lcr_variants(tmp_path, monkeypatch):
    """The baseline's own hinge says nothing about whether LCR acts in the variants: the hinges its statistic must be
    below are those the other variants train LCR with, one claim each."""
    from pathlib import Path

    from tools.study import Study

    monkeypatch.chdir(Path(__file__).resolve().parents[1])

    def hinges(text):
        return Study(load_config(StudyConfig, _study_yaml(tmp_path, text)), "s").lcr_hinges()

    assert hinges(BASE) == [0.75]  # the baseline trains LCR too here, at 0.75: no matter
    raised = BASE.replace("{name: lcr_lmr}", "{name: lcr_lmr, vae_overrides: [loss.lcr.thresh=0.9]}")
    assert hinges(raised) == [0.9]
    assert hinges(raised.replace("]}]", "]}, {name: lcr, vae_overrides: [loss.lcr.thresh=0.8]}]")) == [0.8, 0.9]
    assert hinges(BASE.replace("{name: lcr_lmr}", "{name: lmr, vae_overrides: [loss.lcr.enabled=false]}")) == []


def test_a_vae_stage_key_leaves_out_later_options_only_at_their_defaults(monkeypatch):
    """Finished studies' VAE markers were hashed before loss.lmr.token_init_std existed: at its default it must not
    change the key (else every stage re-runs), and set it must (else a changed token would not re-train)."""
    from pathlib import Path

    from tools.study import _vae_stage_key
    from vae.train_config import VAETrainConfig

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    default = _vae_stage_key(load_config(VAETrainConfig, "configs/vae/tiny_ssvae_patch2.yaml"))
    assert "token_init_std" not in default["loss"]["lmr"] and "mask_probs" in default["loss"]["lmr"]
    scaled = _vae_stage_key(load_config(VAETrainConfig, "configs/vae/tiny_ssvae_patch2.yaml",
                                        ["loss.lmr.token_init_std=0.0"]))
    assert scaled["loss"]["lmr"]["token_init_std"] == 0.0


def test_the_report_setup_states_each_variants_departures_from_the_recipe(tmp_path, monkeypatch):
    from pathlib import Path

    from tools.study import Study

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    text = BASE.replace("{name: lcr_lmr}", "{name: lcr_lmr, vae_overrides: [loss.lcr.thresh=0.9]}, "
                                           "{name: white, control: {source: lcr_lmr, kind: whiten}}, "
                                           "{name: given, path: " + str(tmp_path) + ", t2v_overrides: "
                                           "[model.patch_size=1]}")
    lines = Study(load_config(StudyConfig, _study_yaml(tmp_path, text)), "s").recipe_lines()
    assert lines[0].startswith("- VAE recipe of every trained variant: `configs/vae/tiny.yaml` with none")
    assert "  - lcr_lmr: VAE `loss.lcr.thresh=0.9`" in lines
    assert "  - white: whiten control of `lcr_lmr`" in lines
    assert f"  - given: given ssvae first stage `{tmp_path}`; DiT `model.patch_size=1`" in lines
