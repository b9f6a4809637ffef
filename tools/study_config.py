"""The schema of a convergence study (configs/study/*.yaml) and of the main job (configs/pipeline/*.yaml).

A study trains (or loads) one first stage per variant, measures it, trains the same DiT with the same seeds and
budget on each, and scores the DiT's periodic samples of fixed prompts. The VAE and DiT runs are the existing
entry points (``vae.train``, ``dit.train``) on their own YAMLs plus ``key=value`` overrides; the study only says
which overrides each variant adds. Every composed run config is validated before anything runs.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from infra.config import MISSING, check
from infra.footage import CLIP_NAMES
from tools.unified_reward import UnifiedRewardConfig
from vae.first_stage import FIRST_STAGE_KINDS
from vae.latent_transform import TRANSFORM_KINDS

VIEWS = ("normalised", "whitened")  # how the DiT is shown a variant's latents

LAUNCHERS = ("python", "deepspeed")
REWARDS = ("caption", "unified")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class DefaultDataConfig:
    """One procedurally generated captioned set (``tools.make_default_data``)."""

    num_videos: int = 64
    num_images: int = 64
    size: int = 64
    frames: int = 17
    fps: float = 8.0
    seed: int = 0
    # Scene options of infra.data.synthetic.SyntheticConfig (None / empty: its defaults). Shapes as a fraction of the
    # frame side; class subsets make an easier set (fewer captions to learn) for CPU-scale studies.
    min_radius: Optional[float] = None
    max_radius: Optional[float] = None
    min_travel: Optional[float] = None
    max_travel: Optional[float] = None
    shapes: list[str] = field(default_factory=list)
    colors: list[str] = field(default_factory=list)
    motions: list[str] = field(default_factory=list)
    textures: list[str] = field(default_factory=list)

    def scene(self) -> dict:
        """The scene options that are set, as ``tools.make_default_data`` keyword arguments."""
        from infra.data.synthetic import SCENE_OPTIONS, scene_options

        return scene_options(**{f.name: getattr(self, f.name) for f in fields(self) if f.name in SCENE_OPTIONS})

    def validate(self, prefix: str = "default_data") -> None:
        from infra.data.synthetic import SyntheticConfig

        check(self.num_videos >= 0 and self.num_images >= 0, f"{prefix}.num_videos/num_images", "must be >= 0")
        check(self.size >= 16 and self.size % 2 == 0, f"{prefix}.size", f"must be even and >= 16, got {self.size}")
        check(self.frames >= 1, f"{prefix}.frames", "must be >= 1")
        check(self.fps > 0, f"{prefix}.fps", "must be > 0")
        SyntheticConfig(**self.scene()).validate(prefix)  # the scene options have the generator's field names


@dataclass
class StudyDataConfig:
    """The data the study makes under ``<output_dir>/data``: the default set, real footage shards, held-out clips."""

    default: DefaultDataConfig = field(default_factory=DefaultDataConfig)
    real_footage: bool = True  # pack infra.footage clips into real_train / real_heldout shards
    heldout_clips: list[str] = field(default_factory=lambda: ["city"])  # real clips the VAE never trains on
    # How often the VAE sees each real training clip per epoch (a root weight, real_train*N): 2 real clips beside
    # 1000 generated videos are otherwise ~0.2 % of its batches, and a 16x VAE paints the shapes' colours into faces.
    real_weight: int = 1
    # Point the VAE runs (data.video_roots/image_roots, eval.video_roots) and the DiT runs (data.video_roots) at the
    # generated data. Off at full scale, where vae/t2v overrides name the user's shard folders.
    wire_roots: bool = True

    def validate(self, prefix: str = "data") -> None:
        unknown = sorted(set(self.heldout_clips) - set(CLIP_NAMES))
        check(not unknown, f"{prefix}.heldout_clips", f"unknown clip(s) {unknown}; known: {list(CLIP_NAMES)}")
        check(self.real_weight >= 1, f"{prefix}.real_weight", f"must be >= 1, got {self.real_weight}")


@dataclass
class PromptsConfig:
    """The fixed prompts every DiT samples: captions of a held-out default set (another seed), with their truths."""

    num_prompts: int = 8
    seed: int = 1000  # generation seed of the held-out set; must differ from data.default.seed

    def validate(self, prefix: str = "prompts") -> None:
        check(self.num_prompts >= 1, f"{prefix}.num_prompts", f"must be >= 1, got {self.num_prompts}")


@dataclass
class LauncherConfig:
    """How the trainings start: plainly (``python -m``) or through the ``deepspeed`` launcher."""

    kind: str = "python"
    num_gpus: int = 1  # processes of the deepspeed launcher (1 on CPU)
    omp_threads: int = 0  # OMP_NUM_THREADS of a training that runs alone; 0 leaves the environment's
    # parallel_runs: trainings at once (the VAEs, then the DiTs), omp_threads split among them. On a CPU the tiny
    # models' small matmuls and convolutions scale poorly over threads: two runs of one thread each on 2 cores train
    # 1.2x to 1.5x the steps per hour of one run of two (bench.bench_parallel_runs, docs/STUDY.md). On GPUs keep 1:
    # every run takes all num_gpus.
    parallel_runs: int = 1

    def validate(self, prefix: str = "launcher") -> None:
        check(self.kind in LAUNCHERS, f"{prefix}.kind", f"must be one of {LAUNCHERS}, got {self.kind!r}")
        check(self.num_gpus >= 1, f"{prefix}.num_gpus", "must be >= 1")
        check(self.omp_threads >= 0, f"{prefix}.omp_threads", "must be >= 0")
        check(self.parallel_runs >= 1, f"{prefix}.parallel_runs", f"must be >= 1, got {self.parallel_runs}")
        check(not self.omp_threads or self.parallel_runs <= self.omp_threads, f"{prefix}.parallel_runs",
              f"{self.parallel_runs} runs at once cannot share omp_threads={self.omp_threads} (at least one each)")

    def threads_per_run(self, runs_at_once: int) -> int:
        """OMP_NUM_THREADS of each of ``runs_at_once`` concurrent trainings (0: the environment's)."""
        if runs_at_once <= 1:
            return self.omp_threads
        return max(1, (self.omp_threads or os.cpu_count() or 1) // runs_at_once)


@dataclass
class RunTemplateConfig:
    """A training entry point's YAML plus overrides every variant shares."""

    config: str = MISSING
    overrides: list[str] = field(default_factory=list)

    def validate(self, prefix: str = "") -> None:
        check(Path(self.config).is_file(), f"{prefix}.config", f"{self.config} does not exist")
        bad = [o for o in self.overrides if "=" not in o]
        check(not bad, f"{prefix}.overrides", f"must be key=value, got {bad}")


@dataclass
class ControlConfig:
    """A spectral control (``vae.latent_transform``): another variant's frozen VAE seen through an invertible
    transform of its latents. Reconstructions are the source's; only the latent spectrum the DiT sees changes."""

    source: str = ""  # the variant whose VAE is transformed (one that is not a control itself)
    kind: str = ""  # checkerboard | whiten; empty: the variant is not a control
    cell: int = 1  # checkerboard cell, latent positions (the DiT's patch size flips whole tokens)

    def validate(self, prefix: str = "control") -> None:
        if not self.kind:
            check(not self.source, f"{prefix}.kind", f"name a transform ({TRANSFORM_KINDS}) for source "
                                                     f"{self.source!r}")
            return
        check(self.kind in TRANSFORM_KINDS, f"{prefix}.kind", f"must be one of {TRANSFORM_KINDS}, got {self.kind!r}")
        check(bool(self.source), f"{prefix}.source", "name the variant whose VAE the control transforms")
        check(self.cell >= 1, f"{prefix}.cell", f"must be >= 1, got {self.cell}")


@dataclass
class VariantConfig:
    """One first stage under study."""

    name: str = MISSING
    kind: str = "ssvae"  # ssvae | wan | cogvideox: the first stage's kind (a trained one's VAE config's model.kind)
    # An existing first-stage folder (SSVAE save_pretrained, or a diffusers Wan / CogVideoX VAE): not trained.
    path: str = ""
    vae_config: str = ""  # this variant's VAE YAML instead of vae.config (e.g. configs/vae/tiny_wan.yaml)
    vae_overrides: list[str] = field(default_factory=list)  # added to vae.overrides (e.g. loss.lmr.enabled=false)
    t2v_overrides: list[str] = field(default_factory=list)  # added to t2v.overrides (e.g. first_stage.tile_size=256)
    control: ControlConfig = field(default_factory=ControlConfig)
    # How the DiT is shown this variant's latents: "normalised" (per channel, the paper's DiT input) or "whitened"
    # (channel-whitened with the covariance of its training latents, fitted when its first stage is frozen; the
    # same information and reconstructions). A whitening control compares the two views; this sets the view of the
    # variant itself (the main job's DiT trains on whitened latents: docs/STUDY.md, "The main job").
    view: str = "normalised"

    @property
    def is_control(self) -> bool:
        return bool(self.control.kind)

    @property
    def trains_vae(self) -> bool:
        return not self.path and not self.is_control

    def validate(self, prefix: str = "variant") -> None:
        check(bool(_NAME.match(self.name)), f"{prefix}.name", f"must be letters, digits, _ . - only, got {self.name!r}")
        check(self.kind in FIRST_STAGE_KINDS, f"{prefix}.kind",
              f"must be one of {FIRST_STAGE_KINDS}, got {self.kind!r}")
        # A wan / cogvideox variant without a path is trained here (its vae_overrides set model.kind; the study
        # checks that they agree once the VAE config is composed).
        check(not self.path or Path(self.path).is_dir(), f"{prefix}.path", f"{self.path} is not a folder")
        for key in ("vae_overrides", "t2v_overrides"):
            bad = [o for o in getattr(self, key) if "=" not in o]
            check(not bad, f"{prefix}.{key}", f"must be key=value, got {bad}")
        self.control.validate(f"{prefix}.control")
        check(not self.vae_config or Path(self.vae_config).is_file(), f"{prefix}.vae_config",
              f"{self.vae_config} is not a file")
        check(self.view in VIEWS, f"{prefix}.view", f"must be one of {VIEWS}, got {self.view!r}")
        if self.is_control:
            check(not self.path and not self.vae_overrides, f"{prefix}.control",
                  "a control transforms its source's VAE: it takes no path and no vae_overrides")
            check(self.view == "normalised", f"{prefix}.view",
                  "a control's view is its transform (control.kind); leave view at 'normalised'")


@dataclass
class MeasureConfig:
    """Latent statistics, spectra and reconstruction quality of each frozen first stage."""

    stats_clips: int = 16  # training clips the per-channel latent mean/std are measured on (stored with the model)
    num_clips: int = 8  # held-out clips (real footage, then the prompt set) for spectra and reconstruction
    frames: int = 9
    size: int = 64
    batch_size: int = 2
    cutoff: float = 0.25  # low-frequency cut-off of tools.spectral
    lpips: bool = True  # LPIPS (AlexNet) in the reconstruction table
    # DiT training latents the no-training predictors (spectral numbers, velocity irreducible variance) are
    # measured on, from the latent cache.
    predictor_clips: int = 512
    # Held-out clips (real footage, then the prompt set) of the manipulation check (tools.manipulation_check): its
    # 95 % intervals are over these clips; top_k: the eigenspectrum share it reports (LMR should raise it).
    check_clips: int = 32
    top_k: int = 4
    check_cutoff: float = 0.6  # its low-frequency cut-off: must keep more than the zero bin of the latent

    def validate(self, prefix: str = "measure") -> None:
        check(self.stats_clips >= 1 and self.num_clips >= 1, f"{prefix}.stats_clips/num_clips", "must be >= 1")
        check(self.check_clips >= 2, f"{prefix}.check_clips", f"must be >= 2 (an interval over clips), got "
              f"{self.check_clips}")
        check(self.top_k >= 1, f"{prefix}.top_k", f"must be >= 1, got {self.top_k}")
        check(0 < self.check_cutoff <= 1, f"{prefix}.check_cutoff", "must be in (0, 1]")
        check(self.predictor_clips >= 16, f"{prefix}.predictor_clips", f"must be >= 16, got {self.predictor_clips}")
        check((self.frames - 1) % 4 == 0, f"{prefix}.frames", f"must be 1 + 4k, got {self.frames}")
        check(self.size >= 16 and self.size % 16 == 0, f"{prefix}.size", f"must be a multiple of 16, got {self.size}")
        check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        check(0 < self.cutoff <= 1, f"{prefix}.cutoff", "must be in (0, 1]")


@dataclass
class RewardConfig:
    """How samples are scored and what counts as converged."""

    kind: str = "caption"  # caption (tools.caption_reward, default data truths) | unified (tools.unified_reward)
    # Reward a variant must reach; 0: threshold_fraction x the baseline's final mean reward.
    threshold: float = 0.0
    threshold_fraction: float = 0.9
    # Bootstrap resamples (over seeds and prompts) of the 95 % intervals and paired comparisons (tools.study_stats).
    resamples: int = 2000
    unified: UnifiedRewardConfig = field(default_factory=UnifiedRewardConfig)

    def validate(self, prefix: str = "reward") -> None:
        check(self.kind in REWARDS, f"{prefix}.kind", f"must be one of {REWARDS}, got {self.kind!r}")
        check(self.threshold >= 0, f"{prefix}.threshold", "must be >= 0")
        check(0 < self.threshold_fraction <= 1, f"{prefix}.threshold_fraction", "must be in (0, 1]")
        check(self.resamples >= 100, f"{prefix}.resamples", f"must be >= 100, got {self.resamples}")
        if self.kind == "unified":
            check(Path(self.unified.model_path).is_dir(), f"{prefix}.unified.model_path",
                  f"{self.unified.model_path!r} is not a local folder (the UnifiedReward Qwen2.5-VL model)")


@dataclass
class StudyConfig:
    output_dir: str = "runs/study"
    seeds: list[int] = field(default_factory=lambda: [0])  # one DiT training per variant and seed
    baseline: str = "baseline"  # the variant speed-ups are measured against; "" when there is none (one variant)
    data: StudyDataConfig = field(default_factory=StudyDataConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    vae: RunTemplateConfig = field(default_factory=lambda: RunTemplateConfig(config="configs/vae/tiny.yaml"))
    t2v: RunTemplateConfig = field(default_factory=lambda: RunTemplateConfig(config="configs/t2v/tiny.yaml"))
    cache_latents: bool = True  # encode the DiT data once per variant (dit.latent_cache)
    variants: list[VariantConfig] = field(default_factory=list)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def validate(self, prefix: str = "") -> None:
        check(len(self.variants) >= 1, "variants", "name at least one variant")
        names = [v.name for v in self.variants]
        check(len(set(names)) == len(names), "variants", f"names must be unique, got {names}")
        check(not self.baseline or self.baseline in names, "baseline",
              f"{self.baseline!r} is not a variant name ({names}); use '' for none")
        check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds",
              f"must be a non-empty list of distinct integers, got {list(self.seeds)}")
        check(self.prompts.seed != self.data.default.seed, "prompts.seed",
              "must differ from data.default.seed (the prompts must be held out)")
        by_name = {v.name: v for v in self.variants}
        for i, v in enumerate(self.variants):
            if not v.is_control:
                continue
            source = by_name.get(v.control.source)
            check(source is not None, f"variants[{i}].control.source",
                  f"{v.control.source!r} is not a variant name ({names})")
            check(not source.is_control, f"variants[{i}].control.source",
                  f"{source.name!r} is itself a control; controls transform a VAE")
            check(source.kind == v.kind, f"variants[{i}].kind",
                  f"a control has its source's kind ({source.kind!r}), got {v.kind!r}")
            check(source.view == "normalised", f"variants[{i}].control.source",
                  f"{source.name!r} is shown to the DiT {source.view}; a control transforms normalised latents")

    def variant(self, name: str) -> VariantConfig:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def whitened_controls(self) -> dict[str, str]:
        """Each variant seen through a whitening control -> that control (the report's regularizers x view 2x2)."""
        return {v.control.source: v.name for v in self.variants if v.is_control and v.control.kind == "whiten"}
