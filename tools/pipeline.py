"""The main job: the whole stack end to end, small enough for a laptop CPU (``scripts/main.sh``).

    python -m tools.pipeline --config configs/pipeline/tiny.yaml [key=value ...]

It is the convergence study's machinery (``tools.study``) run on one variant, an SSVAE at the released latent shape
(4x16x16, 48 channels) trained with LCR, its DiT shown the latents whitened: generate the
default data (and a held-out captioned set whose captions are the prompts), pack the real footage into shards (a
held-out part too), train the tiny SSVAE (``vae.train``, through the deepspeed launcher), measure its per-channel
latent statistics and store them with the model, reconstruct every real clip (PSNR/SSIM/LPIPS table, markdown + JSON),
measure its spectra, cache latents, train the tiny text-to-video DiT with the MiniLM text encoder, sample the
held-out captions to mp4 every few steps and score them with the caption-faithfulness reward. It ends by printing
where everything is, also written to ``<output_dir>/report.md``. Re-running skips finished stages.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from tools.study import Study, load_study_config
from tools.study_report import reconstruction_targets


def locations(study: Study, report: dict) -> dict[str, dict[str, str]]:
    """Per variant, the files a person looks at, by what they are."""
    out = {}
    for variant in study.cfg.variants:
        vdir = study.variant_dir(variant)
        fs = study.runner.read_marker(f"{variant.name}/first_stage")["outputs"]
        places = {"VAE training run": vdir / "vae", "VAE (frozen, with its latent statistics)": Path(fs["path"]),
                  "reconstruction table": vdir / "measure" / "reconstruction.md",
                  "reconstruction frames (PNG)": vdir / "measure" / "reconstructions.png",
                  "reconstructions (original | reconstruction)": vdir / "measure" / "reconstructions",
                  "latent spectra": vdir / "measure" / "spectral.json", "latent cache": vdir / "latents"}
        for seed in study.cfg.seeds:
            run = vdir / f"seed{seed}" / "dit"
            steps = sorted((run / "samples").glob("step_*"))
            places[f"DiT run (seed {seed})"] = run
            if steps:
                places[f"final samples (seed {seed})"] = steps[-1]
            places[f"caption rewards per step (seed {seed})"] = vdir / f"seed{seed}" / "reward.json"
        out[variant.name] = {k: str(v) for k, v in places.items()}
    out["report"] = {"study report": report["files"]["markdown"], "reward plot": report["files"]["plot"],
                     "samples (PNG)": str(Path(report["files"]["markdown"]).parent), "data": str(study.data)}
    return out


def summary_lines(study: Study, report: dict) -> list[str]:
    """What the main job measured, per variant: the VAE's reconstructions, then the DiT's reward along training."""
    lines = []
    for variant in study.cfg.variants:
        m = report["measures"][variant.name]
        rec, spec, default = m["reconstruction_mean"], m["spectral"], m.get("default_data") or {}
        heldout = [r for r in m["reconstruction"] if r.get("held_out")]
        row = report["summary"]["variants"][variant.name]
        ceiling = m.get("reconstruction_reward") or {}
        compression = (f"{default['temporal_compression']}x{default['spatial_compression']}x"
                       f"{default['spatial_compression']}" if default else "?")
        pooling = ", ".join(f"{v:.2f} dB at {k}" for k, v in (default.get("pooling_psnr") or {}).items())
        lines.append(f"- **{variant.name}** VAE ({compression} compression, {m['latent_statistics']['channels']} "
                     f"latent channels): held-out default data {default.get('psnr', float('nan')):.2f} dB PSNR over "
                     f"{default.get('clips', 0)} clips (pooling baselines: {pooling}); real footage "
                     f"{rec['psnr']:.2f} dB, SSIM {rec['ssim']:.3f}, LPIPS {rec['lpips']:.3f} over "
                     f"{len(m['reconstruction'])} clips"
                     + (f", held out ({', '.join(r['name'] for r in heldout)}): "
                        f"{sum(r['psnr'] for r in heldout) / len(heldout):.2f} dB" if heldout else ""))
        if ceiling:
            lines.append(f"  caption reward of its reconstructions of the prompt clips {ceiling['mean']:.3f} "
                         f"(the clips themselves {ceiling['original']:.3f}, "
                         f"{ceiling['mean'] / max(ceiling['original'], 1e-9):.2f}x)")
        shown = f"{m['control']['kind']} control" if m.get("control") else m.get("view", "normalised")
        lines.append(f"  latent low-frequency ratio {spec['low_freq_ratio']:.2f}, effective rank "
                     f"{spec['effective_rank']:.1f} (of the latents the DiT is shown: {shown})")
        chance = m.get("chance")
        lines.append(f"  DiT caption reward on {len(study.prompts()[0])} held-out prompts by step (chance "
                     f"{'-' if chance is None else f'{chance:.3f}'}): "
                     + ", ".join(f"{s}: {r:.3f}" for s, r in row["mean_curve"])
                     + f"; final {row['final']['mean']:.3f}")
    return lines + reconstruction_targets(report["measures"])


def write_pipeline_report(study: Study, report: dict) -> Path:
    places = locations(study, report)
    report_dir = Path(report["files"]["markdown"]).parent
    md = ["# Main job", "", *summary_lines(study, report), ""]
    for variant in study.cfg.variants:
        grid = (report["measures"][variant.name].get("default_data") or {}).get("grid")
        samples = report_dir / f"samples_{variant.name}.png"
        md += [f"## Pictures: {variant.name}", ""]
        if grid:
            md += ["Original | reconstruction (frames 0, 4, 8) of prompt clips and held-out real clips:", "",
                   f"![reconstructions]({os.path.relpath(grid, study.out)})", ""]
        if samples.is_file():
            md += ["DiT samples of the first prompts at the first and the last evaluation (caption | reward there):",
                   "", f"![samples]({os.path.relpath(samples, study.out)})", ""]
    md += ["## Where everything is", ""]
    for group, items in places.items():
        md += [f"### {group}", "", *[f"- {what}: `{path}`" for what, path in items.items()], ""]
    for variant in study.cfg.variants:
        table = study.variant_dir(variant) / "measure" / "reconstruction.md"
        if table.is_file():
            md += [table.read_text().replace("# Reconstruction", "## Reconstruction", 1), ""]
    path = study.out / "report.md"
    path.write_text("\n".join(md) + "\n")
    (study.out / "locations.json").write_text(json.dumps(places, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="pipeline YAML (configs/pipeline/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. output_dir=runs/x")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_study_config(args.config, args.overrides)
    study = Study(cfg, args.config)
    report = study.run()
    path = write_pipeline_report(study, report)
    print("\n".join(["", "Main job done.", *summary_lines(study, report), "",
                     *[f"{what}: {where}" for items in locations(study, report).values()
                       for what, where in items.items()],
                     f"report: {path}", f"wall time of this run: {report['wall_s_this_run']:.0f} s"]))
    return report


if __name__ == "__main__":
    main()
