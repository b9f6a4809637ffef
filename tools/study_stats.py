"""Statistics of the convergence study: bootstrap intervals over seeds and prompts, paired comparisons, a verdict.

The data of one variant is ``{seed: {step: [reward of prompt 0, prompt 1, ...]}}``: every seed's DiT sampled the same
prompts, in the same order, at the same steps (the study makes sure of it). Every variant shares the seeds and the
prompts, so a comparison with the baseline can be *paired*: a bootstrap resample draws seeds (with replacement) and
prompts (with replacement) once and applies the same draw to the variant and to the baseline, which removes the
between-prompt and between-seed spread that both share.

Per resample and variant, the curve is the mean reward per step over the drawn seeds and prompts; from it:

- ``steps``: steps to reach the threshold, the first crossing interpolated linearly between evaluation steps (a run
  evaluated every 100 steps that crosses half-way between 200 and 300 took 250); infinite when never reached;
- ``final``: the reward at the last evaluation step;
- ``auc``: the mean reward over the evaluation steps (the area under the curve, per step), a measure of convergence
  speed that needs no threshold.

Intervals are 95 % percentile intervals over the resamples. Paired against the baseline: ``speed_up`` = baseline
steps / variant steps (infinite when only the variant reaches the threshold, 0 when only the baseline does; resamples
where neither does are left out and counted), ``final_diff`` and ``auc_diff`` = variant - baseline. A difference is
called significant when its interval excludes no-difference (1 for a speed-up, 0 for a difference).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

RewardTable = dict[int, dict[int, list[float]]]  # seed -> step -> per-prompt rewards

LEVEL = 0.95


def _as_array(table: RewardTable, seeds: list[int], steps: list[int]) -> np.ndarray:
    """(seeds, steps, prompts) array; every seed must hold every step with the same number of prompts."""
    rows = []
    for seed in seeds:
        if seed not in table:
            raise ValueError(f"no rewards for seed {seed}")
        missing = [s for s in steps if s not in table[seed]]
        if missing:
            raise ValueError(f"seed {seed} has no rewards at steps {missing}")
        rows.append([[np.nan if r is None else r for r in table[seed][s]] for s in steps])
    counts = {len(p) for row in rows for p in row}
    if len(counts) != 1:
        raise ValueError(f"every seed and step must score the same prompts, got prompt counts {sorted(counts)}")
    return np.asarray(rows, dtype=np.float64)  # None (an unparseable score) becomes NaN, left out of means


def crossing_step(steps: np.ndarray, curve: np.ndarray, threshold: float) -> float:
    """First step where the curve reaches ``threshold``, linearly interpolated between evaluations; inf if never.

    ``curve`` may be 2-D (resamples, steps): the result is then one value per row.
    """
    curve = np.atleast_2d(curve)
    out = np.full(curve.shape[0], np.inf)
    above = curve >= threshold
    for i in range(curve.shape[0]):
        hits = np.flatnonzero(above[i])
        if not len(hits):
            continue
        j = hits[0]
        if j == 0:
            out[i] = steps[0]
            continue
        r0, r1 = curve[i, j - 1], curve[i, j]
        frac = (threshold - r0) / (r1 - r0) if r1 > r0 else 1.0
        out[i] = steps[j - 1] + frac * (steps[j] - steps[j - 1])
    return out if out.shape[0] > 1 else float(out[0])


def _interval(values: np.ndarray) -> Optional[list[float]]:
    """95 % percentile interval of the finite-or-infinite values that are not NaN."""
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    # Each end taken at the sample on its outer side rather than interpolated: with infinite values (a curve that
    # never reaches the threshold) linear interpolation gives 0 * inf = NaN at an end.
    lo = np.percentile(values, 100 * (1 - LEVEL) / 2, method="lower")
    hi = np.percentile(values, 100 * (1 + LEVEL) / 2, method="higher")
    return [float(lo), float(hi)]


def _finite_or_none(value: float) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else float(value)


def bootstrap(tables: dict[str, RewardTable], threshold: float, baseline: str = "", resamples: int = 2000,
              seed: int = 0, contrasts: Optional[dict[str, dict[str, float]]] = None) -> dict:
    """Point estimates, 95 % intervals and paired comparisons for every variant; see the module docstring.

    ``contrasts``: named weighted sums of variants whose weights sum to 0 (``{"a - b": {"a": 1, "b": -1}}``), each
    estimated with the same paired resamples as the comparisons with the baseline (final reward and AUC).
    """
    if not tables:
        raise ValueError("no variants to compare")
    for name, weights in (contrasts or {}).items():
        unknown = sorted(set(weights) - set(tables))
        if unknown:
            raise ValueError(f"contrast {name!r} names variants without rewards: {unknown} (have {sorted(tables)})")
        if not weights or abs(sum(weights.values())) > 1e-9:
            raise ValueError(f"contrast {name!r} must have weights that sum to 0, got {weights}")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100 for a 95 % interval, got {resamples}")
    if baseline and baseline not in tables:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {sorted(tables)}")
    seeds = sorted(set.intersection(*(set(t) for t in tables.values())))
    if not seeds:
        raise ValueError("the variants share no seed")
    steps = sorted(set.intersection(*(set(t[s]) for t in tables.values() for s in seeds)))
    if not steps:
        raise ValueError("the variants share no evaluation step")
    data = {v: _as_array(t, seeds, steps) for v, t in tables.items()}
    prompts = {a.shape[2] for a in data.values()}
    if len(prompts) != 1:
        raise ValueError(f"the variants scored different numbers of prompts: {sorted(prompts)}")
    n_prompts = prompts.pop()
    step_axis = np.asarray(steps, dtype=np.float64)
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, len(seeds), (resamples, len(seeds)))
    prompt_draws = rng.integers(0, n_prompts, (resamples, n_prompts))

    def curves(array: np.ndarray) -> np.ndarray:
        """(resamples, steps) mean curves of the drawn seeds and prompts."""
        per_seed = array[seed_draws]  # (R, S, steps, P)
        per_prompt = np.take_along_axis(per_seed, prompt_draws[:, None, None, :], axis=3)
        return np.nanmean(per_prompt, axis=(1, 3))

    estimates, draws = {}, {}
    for variant, array in data.items():
        point_curve = np.nanmean(array, axis=(0, 2))
        boot = curves(array)
        draws[variant] = {"steps": crossing_step(step_axis, boot, threshold), "final": boot[:, -1],
                          "auc": boot.mean(axis=1)}
        point_steps = crossing_step(step_axis, point_curve, threshold)
        reached = np.isfinite(draws[variant]["steps"])
        estimates[variant] = {
            "curve": [[int(s), float(r)] for s, r in zip(steps, point_curve)],
            "steps": _finite_or_none(point_steps),
            "steps_ci": _interval(draws[variant]["steps"]) if reached.mean() >= 0.5 else None,
            "reach_fraction": float(reached.mean()),
            "final": float(point_curve[-1]), "final_ci": _interval(draws[variant]["final"]),
            "auc": float(point_curve.mean()), "auc_ci": _interval(draws[variant]["auc"]),
            "per_seed_final": {str(s): float(np.nanmean(array[i, -1])) for i, s in enumerate(seeds)},
        }
    if baseline:
        base = draws[baseline]
        for variant in data:
            if variant == baseline:
                continue
            estimates[variant]["vs_baseline"] = _paired(draws[variant], base, estimates[variant],
                                                        estimates[baseline])
    combined = {}
    for name, weights in (contrasts or {}).items():
        combined[name] = {"weights": dict(weights)}
        for key in ("final", "auc"):
            diff = sum(w * draws[v][key] for v, w in weights.items())
            interval = _interval(diff)
            combined[name][key] = float(sum(w * estimates[v][key] for v, w in weights.items()))
            combined[name][f"{key}_ci"] = interval
            combined[name][f"{key}_higher"] = _direction(interval, 0.0)
    return {"threshold": threshold, "baseline": baseline or None, "seeds": seeds, "steps": steps,
            "prompts": n_prompts, "resamples": resamples, "level": LEVEL, "variants": estimates,
            "contrasts": combined}


def view_and_regularizer_contrasts(baseline: str, whitened: dict[str, str]) -> dict[str, dict[str, float]]:
    """The 2x2 of regularizers x the DiT's view, as contrasts for :func:`bootstrap`.

    ``whitened`` maps a variant to its whitening control (the same latents, channels decorrelated). With the baseline
    and one regularized variant ``r``, each seen per-channel normalised (the variant itself) and whitened (its
    control), the four cells give: what the regularizers do under each view (r - baseline), what the view does to
    each VAE (whitened - normalised), and whether the two interact. Empty when the baseline has no whitened control.
    """
    if baseline not in whitened:
        return {}
    white_base = whitened[baseline]
    out = {f"view on {baseline}: {white_base} - {baseline}": {white_base: 1.0, baseline: -1.0}}
    for variant, white in whitened.items():
        if variant == baseline:
            continue
        out[f"view on {variant}: {white} - {variant}"] = {white: 1.0, variant: -1.0}
        out[f"regularizers, normalised: {variant} - {baseline}"] = {variant: 1.0, baseline: -1.0}
        out[f"regularizers, whitened: {white} - {white_base}"] = {white: 1.0, white_base: -1.0}
        out[f"interaction: ({white} - {variant}) - ({white_base} - {baseline})"] = {
            white: 1.0, variant: -1.0, white_base: -1.0, baseline: 1.0}
    return out


def _speed_up(base_steps, variant_steps) -> np.ndarray:
    """Baseline steps / variant steps to the threshold, elementwise: 1 when both reach it at the first evaluation
    (step 0, nothing measurable), inf when only the variant does, NaN when neither ever does (undecided)."""
    b, v = np.asarray(base_steps, dtype=float), np.asarray(variant_steps, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where((b == 0) & (v == 0), 1.0, b / v)
    return np.where(np.isinf(b) & np.isinf(v), np.nan, ratio)


def _paired(variant: dict, base: dict, est: dict, base_est: dict) -> dict:
    both_never = np.isinf(variant["steps"]) & np.isinf(base["steps"])
    speed = _speed_up(base["steps"], variant["steps"])
    speed_point = None
    if est["steps"] is not None and base_est["steps"] is not None:
        speed_point = float(_speed_up(base_est["steps"], est["steps"]))
    out = {"speed_up": speed_point, "speed_up_ci": _interval(speed),
           "speed_up_undecided_fraction": float(both_never.mean())}
    for key in ("final", "auc"):
        diff = variant[key] - base[key]
        out[f"{key}_diff"] = est[key] - base_est[key]
        out[f"{key}_diff_ci"] = _interval(diff)
    out["faster"] = _direction(out["speed_up_ci"], 1.0)
    for key in ("final", "auc"):
        out[f"{key}_higher"] = _direction(out[f"{key}_diff_ci"], 0.0)
    return out


def _direction(interval: Optional[list[float]], null: float) -> Optional[bool]:
    """True / False when the interval lies wholly above / below ``null``; None when it holds it (not significant)."""
    if interval is None:
        return None
    if interval[0] > null:
        return True
    if interval[1] < null:
        return False
    return None


def _fmt_ci(interval: Optional[list[float]], digits: int = 2, suffix: str = "") -> str:
    if interval is None:
        return "n/a"

    def one(v: float) -> str:
        return "inf" if math.isinf(v) and v > 0 else ("-inf" if math.isinf(v) else f"{v:.{digits}f}{suffix}")

    return f"[{one(interval[0])}, {one(interval[1])}]"


def verdict(stats: dict) -> list[str]:
    """One sentence per variant against the baseline: which differences are significant at 95 %, which are not."""
    base = stats["baseline"]
    if not base:
        return ["No baseline: no paired comparison."]
    lines = []
    for variant, est in stats["variants"].items():
        paired = est.get("vs_baseline")
        if paired is None:
            continue
        speed = paired["speed_up"]
        speed_text = (f"speed-up {speed:.2f}x" if speed is not None else "speed-up undefined (a curve never reaches "
                      "the threshold)") + f", 95 % CI {_fmt_ci(paired['speed_up_ci'], 2, 'x')}"
        if paired["faster"] is True:
            speed_claim = f"reaches the threshold significantly faster than {base}"
        elif paired["faster"] is False:
            speed_claim = f"reaches the threshold significantly slower than {base}"
        else:
            speed_claim = f"shows no significant difference in speed from {base}"
        final = paired["final_diff"]
        if paired["final_higher"] is True:
            final_claim = "a significantly higher final reward"
        elif paired["final_higher"] is False:
            final_claim = "a significantly lower final reward"
        else:
            final_claim = "no significant difference in final reward"
        lines.append(f"**{variant}** {speed_claim} ({speed_text}) and has {final_claim} ({final:+.3f}, 95 % CI "
                     f"{_fmt_ci(paired['final_diff_ci'], 3)}; area under the curve {paired['auc_diff']:+.3f}, "
                     f"{_fmt_ci(paired['auc_diff_ci'], 3)}).")
    return lines


def rank_correlations(predictors: dict[str, dict[str, Optional[float]]],
                      outcomes: dict[str, dict[str, Optional[float]]]) -> dict[str, dict[str, dict]]:
    """Spearman rank correlation of every predictor with every outcome across variants.

    ``predictors[name][variant]`` and ``outcomes[name][variant]``: variants where either is missing are left out;
    fewer than 3 left gives None.
    """
    from scipy.stats import spearmanr

    out: dict[str, dict[str, dict]] = {}
    for p_name, p_values in predictors.items():
        out[p_name] = {}
        for o_name, o_values in outcomes.items():
            common = [v for v in p_values if p_values[v] is not None and o_values.get(v) is not None
                      and math.isfinite(p_values[v]) and math.isfinite(o_values[v])]
            if len(common) < 3:
                out[p_name][o_name] = {"rho": None, "p": None, "n": len(common)}
                continue
            rho, p = spearmanr([p_values[v] for v in common], [o_values[v] for v in common])
            out[p_name][o_name] = {"rho": None if math.isnan(rho) else float(rho),
                                   "p": None if math.isnan(p) else float(p), "n": len(common)}
    return out
