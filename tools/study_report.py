"""The study's numbers and report: reward curves -> steps to a threshold, speed-up, final reward, relative gain.

A reward curve is ``[(step, reward), ...]`` of one DiT run (one variant, one seed), sorted by step. With several
seeds, the seed-mean curve (over the steps all seeds sampled) gives the headline numbers and the per-seed numbers give
the spread:

- ``steps_to_threshold``: the first sampled step whose reward is >= the threshold; None when never reached.
- ``speed_up`` = baseline steps / variant steps. When the baseline never reaches the threshold but the variant does,
  the speed-up is at least (baseline's last step / variant steps): reported with ``speed_up_lower_bound`` true.
  When the variant never reaches it: None.
- ``final``: the reward at each seed's last sampled step (mean, std, min, max); ``relative_gain`` =
  (final mean - baseline final mean) / baseline final mean.

The threshold is given, or ``fraction`` x the baseline's final mean reward (so "how much sooner does a variant reach
90 % of what the baseline ends with").
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

Curve = list[tuple[int, float]]


def steps_to_threshold(curve: Curve, threshold: float) -> Optional[int]:
    for step, reward in sorted(curve):
        if reward >= threshold:
            return int(step)
    return None


def mean_curve(curves: list[Curve]) -> Curve:
    """Mean reward per step over the steps every curve holds."""
    if not curves:
        return []
    common = set.intersection(*({s for s, _ in c} for c in curves))
    by_step = [dict(c) for c in curves]
    return [(s, float(np.mean([d[s] for d in by_step]))) for s in sorted(common)]


def _spread(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "min": float(a.min()),
            "max": float(a.max()), "n": len(a)}


def _speed_up(base_steps: Optional[int], base_last: Optional[int],
              steps: Optional[int]) -> tuple[Optional[float], bool]:
    """(speed-up, is a lower bound) of a variant needing ``steps`` against a baseline needing ``base_steps``."""
    if steps is None or steps <= 0:
        return None, False
    if base_steps is not None:
        return base_steps / steps, False
    if base_last is not None:
        return base_last / steps, True
    return None, False


def reward_summary(curves: dict[str, dict[int, Curve]], baseline: str = "", threshold: float = 0.0,
                   fraction: float = 0.9) -> dict:
    """Numbers per variant from ``{variant: {seed: curve}}``; see the module docstring."""
    means = {v: mean_curve(list(seeds.values())) for v, seeds in curves.items()}
    finals = {v: {seed: c[-1][1] for seed, c in seeds.items() if c} for v, seeds in curves.items()}
    base_final = _spread(list(finals[baseline].values()))["mean"] if baseline in curves else None
    if threshold <= 0:
        reference = base_final if base_final is not None else max(
            (_spread(list(f.values()))["mean"] or 0.0 for f in finals.values()), default=0.0)
        threshold = fraction * reference
    # A threshold of 0 (every final reward 0: nothing learned yet) would count the first sample as converged.
    usable = threshold > 0
    reach = (lambda curve: steps_to_threshold(curve, threshold)) if usable else (lambda curve: None)
    base = {"steps": reach(means[baseline]) if baseline in curves else None,
            "last": means[baseline][-1][0] if baseline in curves and means[baseline] else None,
            "per_seed": {s: reach(c) for s, c in curves.get(baseline, {}).items()},
            "last_per_seed": {s: c[-1][0] for s, c in curves.get(baseline, {}).items() if c}}
    out = {"threshold": threshold, "baseline": baseline or None, "variants": {},
           "note": None if usable else "no usable threshold: the reference final reward is 0 (nothing learned yet)"}
    for variant, seeds in curves.items():
        steps = reach(means[variant])
        speed_up, lower = _speed_up(base["steps"], base["last"], steps) if baseline in curves else (None, False)
        per_seed_steps = {s: reach(c) for s, c in seeds.items()}
        per_seed_speed = {}
        for s, n in per_seed_steps.items():
            if baseline in curves and s in base["per_seed"]:
                value, _ = _speed_up(base["per_seed"][s], base["last_per_seed"].get(s), n)
                if value is not None:
                    per_seed_speed[s] = value
        final = _spread(list(finals[variant].values()))
        gain = None
        if base_final is not None and final["mean"] is not None and base_final != 0:
            gain = (final["mean"] - base_final) / abs(base_final)
        reached = [n for n in per_seed_steps.values() if n is not None]
        out["variants"][variant] = {
            "steps_to_threshold": steps,
            "speed_up": speed_up,
            "speed_up_lower_bound": lower,
            "seeds_reaching": len(reached),
            "seeds": len(seeds),
            "steps_per_seed": {str(s): n for s, n in per_seed_steps.items()},
            "steps_spread": _spread(reached),
            "speed_up_per_seed": {str(s): v for s, v in per_seed_speed.items()},
            "speed_up_spread": _spread(list(per_seed_speed.values())),
            "final": final,
            "relative_gain": gain,
            "mean_curve": [[s, r] for s, r in means[variant]],
        }
    return out


# -------------------------------------------------------------------------------------------------------- output
def plot_rewards(curves: dict[str, dict[int, Curve]], threshold: float, path: str | Path,
                 chance: float | None = None) -> Path:
    """Reward versus step per variant: seed mean, with the min-max band over seeds when there are several, and the
    threshold and the reward's chance level as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for variant, seeds in curves.items():
        mean = mean_curve(list(seeds.values()))
        if not mean:
            continue
        xs = [s for s, _ in mean]
        label = f"{variant} ({len(seeds)} seed{'' if len(seeds) == 1 else 's'})"
        line, = ax.plot(xs, [r for _, r in mean], marker="o", markersize=3, label=label)
        if len(seeds) > 1:
            rows = [dict(c) for c in seeds.values()]
            low = [min(r[s] for r in rows) for s in xs]
            high = [max(r[s] for r in rows) for s in xs]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
    if threshold > 0:
        ax.axhline(threshold, color="gray", linestyle=":", linewidth=1, label=f"threshold {threshold:.3f}")
    if chance is not None:
        ax.axhline(chance, color="black", linestyle="--", linewidth=0.8, label=f"chance {chance:.3f}")
    ax.set_xlabel("DiT training step")
    ax.set_ylabel("reward")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def chance_level(measures: dict[str, dict]) -> float | None:
    """The reward a random caption-to-clip assignment scores on the prompts, as the first-stage measures hold it."""
    return next((m.get("chance") for m in measures.values() if m.get("chance") is not None), None)


def _fmt(value, digits: int = 3, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return f"{value}{suffix}"
    return f"{value:.{digits}f}{suffix}"


def _pm(spread: dict, digits: int = 3) -> str:
    if spread.get("mean") is None:
        return "-"
    if spread["n"] > 1:
        return f"{spread['mean']:.{digits}f} ± {spread['std']:.{digits}f} (n={spread['n']})"
    return f"{spread['mean']:.{digits}f}"


def markdown_tables(summary: dict, measures: dict[str, dict], walls: dict[str, dict]) -> str:
    """The convergence table and the first-stage table (``measures[variant]`` from the study's measure stage)."""
    lines = [f"Threshold: reward >= {summary['threshold']:.4f}"
             + (f" (baseline: {summary['baseline']})" if summary["baseline"] else "")
             + (f". **{summary['note']}**" if summary.get("note") else ""), "",
             "| variant | steps to threshold | speed-up | final reward | relative gain | seeds reaching |",
             "| --- | --- | --- | --- | --- | --- |"]
    for variant, row in summary["variants"].items():
        steps = _fmt(row["steps_to_threshold"])
        if row["steps_spread"]["n"] > 1:
            steps += f" (per seed {_pm(row['steps_spread'], 0)})"
        speed = _fmt(row["speed_up"], 2, "x")
        if row["speed_up_lower_bound"] and row["speed_up"] is not None:
            speed = ">= " + speed
        if row["speed_up_spread"]["n"] > 1:
            speed += f" (per seed {_pm(row['speed_up_spread'], 2)})"
        gain = "-" if row["relative_gain"] is None else f"{100 * row['relative_gain']:+.1f} %"
        lines.append(f"| {variant} | {steps} | {speed} | {_pm(row['final'])} | {gain} | "
                     f"{row['seeds_reaching']}/{row['seeds']} |")
    lines += ["", "Steps to threshold here: the first evaluation at which the seed-mean curve reaches it (per seed: each "
              "seed's first such evaluation), a multiple of the evaluation interval; the statistics below interpolate "
              "between evaluations and resample prompts, so their steps are finer and their intervals are the ones "
              "to read."]
    lines += ["", "| variant | compression | default-data PSNR (dB) | real PSNR (dB) | held-out real PSNR (dB) | SSIM | "
              "LPIPS | rec. reward | low-freq ratio | temporal low-freq ratio | effective rank | top-4 share | "
              "mean kurtosis | VAE train (s) | DiT train (s, mean per seed) |",
              "| --- " * 15 + "|"]
    ceilings, pooling = [], {}
    for variant, m in measures.items():
        rec, spec, wall = m.get("reconstruction_mean", {}), m.get("spectral", {}), walls.get(variant, {})
        ceiling = m.get("reconstruction_reward") or {}
        default = m.get("default_data") or {}
        if ceiling:
            ceilings.append((variant, ceiling))
        if default.get("pooling_psnr"):
            pooling = default
        heldout = [r["psnr"] for r in m.get("reconstruction", []) if r.get("held_out")]
        compression = (f"{default['temporal_compression']}x{default['spatial_compression']}x"
                       f"{default['spatial_compression']}" if default.get("spatial_compression") else "-")
        lines.append(
            f"| {variant} | {compression} | {_fmt(default.get('psnr'), 2)} | {_fmt(rec.get('psnr'), 2)} | "
            f"{_fmt(sum(heldout) / len(heldout) if heldout else None, 2)} | {_fmt(rec.get('ssim'))} | "
            f"{_fmt(rec.get('lpips'))} | {_fmt(ceiling.get('mean'))} | "
            f"{_fmt(spec.get('low_freq_ratio'), 2)} | {_fmt(spec.get('temporal_low_freq_ratio'), 2)} | "
            f"{_fmt(spec.get('effective_rank'), 1)} | {_fmt(spec.get('top_4_share'))} | "
            f"{_fmt(spec.get('mean_kurtosis'), 2)} | {_fmt(wall.get('vae'), 0)} | {_fmt(wall.get('dit'), 0)} |")
    if pooling:
        lines += ["", f"default-data PSNR: the {pooling['clips']} prompt clips (default data of a seed no VAE trained "
                  "on). Each frame replaced by its block means gives " + ", ".join(
                      f"{v:.2f} dB at {k}" for k, v in pooling["pooling_psnr"].items())
                  + " (the pooling baselines: what a latent that only averages carries)."]
    lines += reconstruction_targets(measures)
    if ceilings:
        original = ceilings[0][1]["original"]
        lines += ["", f"rec. reward: the caption reward of each VAE's reconstructions of the {ceilings[0][1]['clips']} "
                  f"prompt clips (the clips themselves score {original:.3f}, chance {ceilings[0][1]['chance']:.3f}). "
                  "DiT samples are decoded by the same VAE, so this bounds what they can score."]
        weak = [v for v, c in ceilings if c["mean"] < 0.5 * original]
        if weak:
            lines.append(f"**{', '.join(weak)}: the VAE's own reconstructions score under half of the originals; "
                         "a reward that stays low says more about the VAE budget than about diffusability.**")
    return "\n".join(lines) + "\n"


# What a first stage must reconstruct before its DiT is worth comparing (#21): the margin over a 16x16 average pool
# (a latent that only averages at the paper's spatial compression) on default and real clips, and the share of the
# originals' caption reward its reconstructions keep.
TARGET_MARGIN_DB = {"default": 2.0, "real": 0.0}
TARGET_REWARD_FRACTION = 0.9


def reconstruction_targets(measures: dict[str, dict]) -> list[str]:
    """Per first stage: PSNR beside the 16x16 pool on held-out default clips and held-out real footage, and the
    reward its reconstructions keep, each against the target."""
    rows = []
    for variant, m in measures.items():
        default, real = m.get("default_data") or {}, (m.get("default_data") or {}).get("real_footage") or {}
        reward = m.get("reconstruction_reward") or {}
        cells = []
        for name, part in (("default", default), ("real", real)):
            pool = (part.get("pooling_psnr") or {}).get("16x")
            if part.get("psnr") is None or pool is None:
                cells.append("-")
                continue
            margin = part["psnr"] - pool
            ok = margin >= TARGET_MARGIN_DB[name]
            cells.append(f"{part['psnr']:.2f} vs {pool:.2f} ({margin:+.2f}) {'yes' if ok else '**no**'}")
        if reward.get("original"):
            ratio = reward["mean"] / reward["original"]
            cells.append(f"{ratio:.2f}x {'yes' if ratio >= TARGET_REWARD_FRACTION else '**no**'}")
        else:
            cells.append("-")
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", "Reconstruction targets (PSNR in dB against the 16x16 average pool of the same clips; the reward "
            "of the reconstructions against the originals'):", "",
            f"| variant | default clips (>= pool + {TARGET_MARGIN_DB['default']:g} dB) | held-out real footage "
            f"(>= pool) | rec. reward (>= {TARGET_REWARD_FRACTION:g}x) |", "| --- | --- | --- | --- |", *rows]


def write_report(out_dir: str | Path, title: str, summary: dict, curves: dict[str, dict[int, Curve]],
                 measures: dict[str, dict], walls: dict[str, dict], sections: list[str] = ()) -> dict[str, Path]:
    """``report.md``, ``report.json`` and ``reward_vs_step.png`` under ``out_dir``; extra markdown ``sections``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_rewards(curves, summary["threshold"], out / "reward_vs_step.png", chance_level(measures))
    data = {"summary": summary, "curves": {v: {str(s): c for s, c in seeds.items()} for v, seeds in curves.items()},
            "first_stages": measures, "wall_s": walls}
    (out / "report.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    md = [f"# {title}", "", f"![reward versus step]({png.name})", "", markdown_tables(summary, measures, walls),
          *sections]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return {"markdown": out / "report.md", "json": out / "report.json", "plot": png}


# ---------------------------------------------------------------------------------------------- statistics
PREDICTORS = {  # name in the predictors stage's outputs -> column title
    "low_freq_ratio": "low-freq ratio", "temporal_low_freq_ratio": "temporal low-freq ratio",
    "effective_rank": "effective rank", "top_4_share": "top-4 share", "viv": "VIV",
}


def _ci(value, interval, digits: int = 3, suffix: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}f}{suffix}"
    if interval is None:
        return text
    lo, hi = (("inf" if math.isinf(v) and v > 0 else f"{v:.{digits}f}{suffix}") for v in interval)
    return f"{text} [{lo}, {hi}]"


def _reading(higher: bool | None) -> str:
    return {True: "**higher**", False: "**lower**", None: "no significant difference"}[higher]


def two_by_two_lines(contrasts: dict) -> list[str]:
    """Markdown of the regularizers x view contrasts (:func:`tools.study_stats.view_and_regularizer_contrasts`)."""
    if not contrasts:
        return []
    lines = ["### The 2x2: what the regularizers put into the latents, and how the DiT is shown them", "",
             "Each regularized VAE and the baseline, seen by the DiT per-channel normalised (the paper's input) and "
             "whitened (the same latents with decorrelated channels; the reconstructions are identical). Paired "
             "differences with 95 % intervals; \"interaction\": whether the view helps one VAE more than the other.", "",
             "| contrast | final reward | reading | AUC | reading |", "| --- | --- | --- | --- | --- |"]
    for name, c in contrasts.items():
        lines.append(f"| {name} | {_ci(c['final'], c['final_ci'])} | {_reading(c['final_higher'])} | "
                     f"{_ci(c['auc'], c['auc_ci'])} | {_reading(c['auc_higher'])} |")
    view = [c["final"] for n, c in contrasts.items() if n.startswith("view on ")]
    regs = [c["final"] for n, c in contrasts.items() if n.startswith("regularizers, ")]
    if view and regs:
        bigger = "the view" if min(abs(v) for v in view) > max(abs(r) for r in regs) else (
            "the regularizers" if min(abs(r) for r in regs) > max(abs(v) for v in view) else "neither consistently")
        lines += ["", f"In final reward, the view moves the DiT by {min(view):+.3f} to {max(view):+.3f}, the "
                      f"regularizers by {min(regs):+.3f} to {max(regs):+.3f}: {bigger} matters more here."]
    return lines + [""]


def statistics_section(tables: dict, measures: dict, summary: dict, baseline: str,
                       resamples: int = 2000, contrasts: dict | None = None) -> tuple[list[str], dict | None]:
    """Markdown of the bootstrap statistics, the verdict and the no-training predictors, and the numbers behind it.

    ``tables[variant][seed][step]`` = per-prompt rewards. Returns ([], None) when they are missing (a study run before
    per-prompt rewards were kept). ``contrasts`` (name -> weights of variants) are estimated on the same resamples;
    those of variants without rewards are left out.
    """
    from tools.study_stats import bootstrap, rank_correlations, verdict

    if not tables or any(not seeds or any(not steps for steps in seeds.values()) for seeds in tables.values()):
        return [], None
    threshold = summary["threshold"]
    contrasts = {n: w for n, w in (contrasts or {}).items() if set(w) <= set(tables)}
    stats = bootstrap(tables, threshold, baseline if baseline in tables else "", resamples, contrasts=contrasts)
    chance = chance_level(measures)
    original = next((m["reconstruction_reward"]["original"] for m in measures.values()
                     if m.get("reconstruction_reward")), None)
    lines = [f"## Statistics: 95 % bootstrap intervals over seeds {stats['seeds']} and {stats['prompts']} prompts "
             f"({stats['resamples']} resamples), paired against {baseline or 'nothing'}", "",
             f"Reward threshold {threshold:.3f}; chance level of the reward on these prompts "
             f"{'-' if chance is None else f'{chance:.3f}'}"
             + ("" if original is None else f"; the prompt clips themselves score {original:.3f}") + ". Steps to "
             "threshold are interpolated between evaluations; the area under the curve (AUC) is the mean reward over "
             "the evaluations.", "",
             "| variant | steps to threshold | speed-up | final reward | final - baseline | AUC | AUC - baseline |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for variant, est in stats["variants"].items():
        paired = est.get("vs_baseline") or {}
        steps = _ci(est["steps"], est["steps_ci"], 0) if est["steps"] is not None else (
            f"never ({100 * est['reach_fraction']:.0f} % of resamples reach it)")
        lines.append(f"| {variant} | {steps} | {_ci(paired.get('speed_up'), paired.get('speed_up_ci'), 2, 'x')} | "
                     f"{_ci(est['final'], est['final_ci'])} | "
                     f"{_ci(paired.get('final_diff'), paired.get('final_diff_ci'))} | "
                     f"{_ci(est['auc'], est['auc_ci'])} | {_ci(paired.get('auc_diff'), paired.get('auc_diff_ci'))} |")
    verdict_lines = verdict(stats)
    best = max(stats["variants"], key=lambda v: stats["variants"][v]["final"])
    best_est = stats["variants"][best]
    verdict_lines.insert(0, f"The best final reward is **{best}**'s, {_ci(best_est['final'], best_est['final_ci'])} "
                            f"(chance {'-' if chance is None else f'{chance:.3f}'}).")
    lines += ["", "### Verdict", "", *[f"- {line}" for line in verdict_lines], "",
              *two_by_two_lines(stats["contrasts"])]

    predictors = {key: {v: (m.get("predictors") or {}).get(key) for v, m in measures.items()} for key in PREDICTORS}
    outcomes = {"final reward": {v: e["final"] for v, e in stats["variants"].items()},
                "AUC": {v: e["auc"] for v, e in stats["variants"].items()},
                "speed (-steps)": {v: (-e["steps"] if e["steps"] is not None else None)
                                   for v, e in stats["variants"].items()}}
    correlations = rank_correlations(predictors, outcomes)
    lines += ["## Predictors that need no DiT training", "",
              "Measured on the DiT's training latents (normalised, after any control transform). VIV: velocity "
              "irreducible variance (tools.diffusability; lower = less ambiguous targets).", "",
              "| variant | " + " | ".join(PREDICTORS.values()) + " | final reward | AUC |",
              "| --- " * (len(PREDICTORS) + 3) + "|"]
    for variant in stats["variants"]:
        values = [predictors[key][variant] for key in PREDICTORS]
        lines.append(f"| {variant} | " + " | ".join(_fmt(v, 3) for v in values)
                     + f" | {stats['variants'][variant]['final']:.3f} | {stats['variants'][variant]['auc']:.3f} |")
    lines += ["", "Spearman rank correlation across variants and controls (n, p in brackets):", "",
              "| predictor | " + " | ".join(outcomes) + " |", "| --- " * (len(outcomes) + 1) + "|"]
    for key, title in PREDICTORS.items():
        cells = []
        for outcome in outcomes:
            c = correlations[key][outcome]
            cells.append("-" if c["rho"] is None else f"{c['rho']:+.2f} (n={c['n']}, p={c['p']:.2f})")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines, {**stats, "verdict": verdict_lines, "predictors": predictors, "correlations": correlations}
