"""The study's statistics on constructed reward curves: a known 2x speed-up is recovered, a known null is not called."""

import math

import numpy as np
import pytest

from tools.study_stats import bootstrap, crossing_step, rank_correlations, verdict, view_and_regularizer_contrasts

STEPS = [0, 100, 200, 300, 400, 500, 600, 700, 800]


def curves(rate: float, seeds=(0, 1, 2), prompts: int = 32, seed: int = 0, ceiling: float = 0.9) -> dict:
    """Per-prompt rewards in {0, 1/3, 2/3, 1} (three attributes right or wrong) around ceiling * (1 - exp(-rate s)),
    with a per-seed and a per-prompt difficulty, so seeds and prompts spread as real runs do."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 0.08, prompts)
    table = {}
    for s in seeds:
        seed_shift = rng.normal(0, 0.04)
        table[s] = {}
        for step in STEPS:
            p = np.clip(ceiling * (1 - math.exp(-rate * step)) + seed_shift - difficulty, 0.02, 0.98)
            table[s][step] = (rng.binomial(3, p) / 3).tolist()
    return table


def test_crossing_step_interpolates_between_evaluations():
    steps = np.array([0.0, 100.0, 200.0])
    assert crossing_step(steps, np.array([0.0, 0.2, 0.6]), 0.4) == pytest.approx(150.0)
    assert crossing_step(steps, np.array([0.5, 0.6, 0.7]), 0.4) == 0.0
    assert math.isinf(crossing_step(steps, np.array([0.0, 0.1, 0.2]), 0.4))


def test_a_known_two_fold_speed_up_is_recovered_and_called_significant():
    tables = {"baseline": curves(0.0025, seed=1), "fast": curves(0.005, seed=2)}
    stats = bootstrap(tables, threshold=0.45, baseline="baseline", resamples=1000)
    fast = stats["variants"]["fast"]["vs_baseline"]
    lo, hi = fast["speed_up_ci"]
    assert lo < 2.0 < hi and lo > 1.0  # the true ratio is inside, and 1 is excluded
    assert 1.6 < fast["speed_up"] < 2.5
    assert fast["faster"] is True
    assert "fast** reaches the threshold significantly faster" in " ".join(verdict(stats))


def test_a_known_null_is_not_called_significant():
    # Same curves, other noise: no difference may be claimed, in speed or in final reward.
    tables = {"baseline": curves(0.004, seed=3), "same": curves(0.004, seed=4)}
    stats = bootstrap(tables, threshold=0.45, baseline="baseline", resamples=1000)
    same = stats["variants"]["same"]["vs_baseline"]
    assert same["speed_up_ci"][0] < 1.0 < same["speed_up_ci"][1]
    assert same["final_diff_ci"][0] < 0.0 < same["final_diff_ci"][1]
    assert same["faster"] is None and same["final_higher"] is None
    assert "no significant difference in speed" in " ".join(verdict(stats))


def test_a_lower_plateau_is_a_significantly_lower_final_reward():
    tables = {"baseline": curves(0.004, seed=5), "worse": curves(0.004, seed=6, ceiling=0.55)}
    stats = bootstrap(tables, threshold=0.3, baseline="baseline", resamples=500)
    assert stats["variants"]["worse"]["vs_baseline"]["final_higher"] is False


def test_pairing_uses_the_same_seeds_and_prompts():
    base = curves(0.004, seed=7)
    # The variant is the baseline plus exactly 0.05 everywhere: a paired interval is tight around it.
    shifted = {s: {st: [r + 0.05 for r in v] for st, v in steps.items()} for s, steps in base.items()}
    stats = bootstrap({"baseline": base, "plus": shifted}, threshold=0.3, baseline="baseline", resamples=500)
    lo, hi = stats["variants"]["plus"]["vs_baseline"]["final_diff_ci"]
    assert lo == pytest.approx(0.05) and hi == pytest.approx(0.05)


def test_bad_inputs_raise_clear_errors():
    good = curves(0.004)
    with pytest.raises(ValueError, match="baseline 'nope'"):
        bootstrap({"a": good}, 0.3, "nope")
    fewer = {s: dict(t) for s, t in good.items()}
    fewer[0][800] = good[0][800][:10]
    with pytest.raises(ValueError, match="same prompts"):
        bootstrap({"a": fewer}, 0.3)
    with pytest.raises(ValueError, match="share no seed"):
        bootstrap({"a": {0: good[0]}, "b": {1: good[1]}}, 0.3)


def test_rank_correlations():
    out = rank_correlations({"p": {"a": 1.0, "b": 2.0, "c": 3.0, "d": None}},
                            {"o": {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}, "short": {"a": 1.0}})
    assert out["p"]["o"]["rho"] == pytest.approx(1.0) and out["p"]["o"]["n"] == 3
    assert out["p"]["short"]["rho"] is None


def test_interval_with_never_reached_resamples_is_open_ended_not_nan():
    # 10 % of resamples never reach the threshold (speed-up inf): the upper end is inf, the lower one finite.
    from tools.study_stats import _interval

    values = np.concatenate([np.linspace(2.0, 4.0, 90), np.full(10, np.inf)])
    lo, hi = _interval(values)
    assert 2.0 <= lo < 2.2 and math.isinf(hi) and hi > 0


def test_speed_up_when_a_curve_reaches_the_threshold_at_step_zero():
    # Both curves reach the threshold at the first evaluation: speed-up 1, no division by zero.
    tables = {name: {0: {0: [0.9, 0.9], 10: [0.9, 0.9]}} for name in ("base", "v")}
    stats = bootstrap(tables, 0.5, "base", resamples=200)
    paired = stats["variants"]["v"]["vs_baseline"]
    assert paired["speed_up"] == 1.0
    # The resamples use the same rule (they were 0/0 = NaN and dropped, leaving no interval).
    assert paired["speed_up_ci"] == [1.0, 1.0] and paired["faster"] is None


def test_speed_up_elementwise_cases():
    from tools.study_stats import _speed_up

    out = _speed_up([100, 0, 100, np.inf, np.inf, 0], [50, 0, 0, 50, np.inf, 100])
    assert out[0] == 2.0 and out[1] == 1.0 and math.isinf(out[2]) and math.isinf(out[3])
    assert math.isnan(out[4]) and out[5] == 0.0


def test_the_2x2_separates_a_view_effect_from_no_regularizer_effect():
    # Whitening raises the plateau from 0.5 to 0.8 for both VAEs; the regularizers change nothing.
    tables = {"baseline": curves(0.004, seed=11, ceiling=0.5), "reg": curves(0.004, seed=12, ceiling=0.5),
              "baseline_white": curves(0.004, seed=13, ceiling=0.8), "reg_white": curves(0.004, seed=14, ceiling=0.8)}
    contrasts = view_and_regularizer_contrasts("baseline", {"baseline": "baseline_white", "reg": "reg_white"})
    assert len(contrasts) == 5
    stats = bootstrap(tables, threshold=0.3, baseline="baseline", resamples=1000, contrasts=contrasts)
    by_kind = {name.split(":")[0]: c for name, c in stats["contrasts"].items()}
    assert stats["contrasts"]["view on baseline: baseline_white - baseline"]["final_higher"] is True
    assert stats["contrasts"]["view on reg: reg_white - reg"]["final_higher"] is True
    assert 0.2 < by_kind["view on reg"]["final"] < 0.4
    for kind in ("regularizers, normalised", "regularizers, whitened", "interaction"):
        assert by_kind[kind]["final_higher"] is None, kind  # a null: not called significant
    # A two-term contrast is the paired comparison with the baseline, on the same resamples.
    reg = stats["contrasts"]["regularizers, normalised: reg - baseline"]
    paired = stats["variants"]["reg"]["vs_baseline"]
    assert reg["final"] == pytest.approx(paired["final_diff"]) and reg["final_ci"] == paired["final_diff_ci"]


def test_the_2x2_needs_the_baseline_seen_whitened_and_contrasts_must_be_contrasts():
    assert view_and_regularizer_contrasts("baseline", {"reg": "reg_white"}) == {}
    tables = {"a": curves(0.004, seed=15), "b": curves(0.004, seed=16)}
    with pytest.raises(ValueError, match="'a - c' names variants without rewards: \\['c'\\]"):
        bootstrap(tables, 0.3, resamples=100, contrasts={"a - c": {"a": 1, "c": -1}})
    with pytest.raises(ValueError, match=r"'a \+ b' must have weights that sum to 0"):
        bootstrap(tables, 0.3, resamples=100, contrasts={"a + b": {"a": 1, "b": 1}})


def test_the_report_gives_the_2x2_and_the_best_variant_beside_chance():
    from tools.study_report import statistics_section

    tables = {"baseline": curves(0.004, seed=21, ceiling=0.45), "reg": curves(0.004, seed=22, ceiling=0.45),
              "baseline_white": curves(0.004, seed=23, ceiling=0.8), "reg_white": curves(0.004, seed=24, ceiling=0.8)}
    contrasts = view_and_regularizer_contrasts("baseline", {"baseline": "baseline_white", "reg": "reg_white"})
    contrasts["with a variant that has no rewards"] = {"reg": 1.0, "absent": -1.0}  # left out, not an error
    measures = {v: {"chance": 0.28} for v in tables}
    lines, stats = statistics_section(tables, measures, {"threshold": 0.3}, "baseline", 300, contrasts)
    text = "\n".join(lines)
    assert "### The 2x2" in text and len(stats["contrasts"]) == 5
    assert "| view on reg: reg_white - reg |" in text and "the view matters more here" in text
    best = stats["verdict"][0]
    assert best.startswith("The best final reward is **") and "(chance 0.280)" in best
    assert stats["variants"][best.split("**")[1]]["final"] == max(e["final"] for e in stats["variants"].values())
