"""Uncertainty across pretraining replicates: nested intervals, replicate-level tests, variance components.

An arm pretrained R times (``train.replicates``) is evaluated R times; each evaluation is a
``stats.Scores`` (S probe or fine-tuning seeds x n examples, the same seeds and examples for every
replicate and every arm). Three sources of variance, outside in: the pretraining run (initialisation,
data order, masks), the seed, the evaluation example.

- ``estimate``: the mean over replicates (each the mean over seeds) with a nested percentile bootstrap
  interval: each resample draws R replicates with replacement, then S seeds, then n examples. Seeds and
  examples are crossed with replicates (every replicate is scored on the same ones), so one draw of
  seed and example indices serves every replicate of a resample.
- ``components``: how the variance splits, by the balanced nested-ANOVA method of moments: between seeds
  within a replicate (mean within-replicate variance of the per-seed values), between replicates (the
  variance of the replicate means less the seed part, floored at 0), and from the n examples (the
  bootstrap variance of the mean when only examples are resampled).
- ``compare``: arm a minus arm b. Replicate r of every arm shares its data-order and mask seed, so equal
  replicate counts are paired by replicate; the nested bootstrap then draws the same replicates, seeds and
  examples for both. The test works at the replicate level, the level the pretraining variance lives at:
  a paired t-test on the replicate means (``scipy.stats.ttest_rel``; in this balanced design it equals the
  nested-ANOVA F test of arm over replicate), ``scipy.stats.ttest_1samp`` against a reference evaluated
  once (the teacher, held fixed), ``scipy.stats.ttest_ind`` (Welch) otherwise. Its interval is the
  t-test's. A permutation test over replicate labels is no option at R = 3: 8 sign flips (20 relabellings
  unpaired) cannot reach p < 0.05; statsmodels' MixedLM Wald z is anti-conservative with 3 groups
  (``tests/eval/test_nested.py`` shows the t-test calibrated by simulation).
- ``verdicts``: Benjamini-Hochberg across the family (``scipy.stats.false_discovery_control``), then
  better / worse / no detectable difference, only from ``MIN_REPLICATES`` replicates on; below, the
  differences and intervals are reported with no call.
- ``detectable``: the smallest difference the t-test finds with power 0.8 at R replicates
  (``statsmodels.stats.power.TTestPower``, exact noncentral t) after Benjamini-Hochberg over the family
  (at the Bonferroni level alpha / m, which BH never falls below), from the measured components of the
  difference: SD of a replicate-mean difference = sqrt(var_replicate + var_seed / S).
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import stats as scipy_stats

from kdfast.eval.stats import POWER, RESAMPLES, Scores, check_level

MIN_REPLICATES = 3          # verdicts are called from this many pretraining replicates per arm on
COMPONENTS = ("replicate", "seed", "examples")


def _check_same(evaluations: Sequence[Scores]) -> None:
    if not evaluations:
        raise ValueError("scores: expected at least one replicate's evaluation, got none")
    first = evaluations[0]
    for other in evaluations[1:]:
        if other.predictions.shape != first.predictions.shape or other.metric != first.metric:
            raise ValueError(f"scores: expected every replicate evaluated alike, got {first.predictions.shape} "
                             f"{first.metric} and {other.predictions.shape} {other.metric}")


def _per_seed(evaluations: Sequence[Scores]) -> np.ndarray:
    """[R, S] the metric of each replicate and seed on all examples."""
    return np.array([[float(e.value(np.array([s]))) for s in range(e.seeds)] for e in evaluations])


def _draws(evaluations: Sequence[Scores], resamples: int, rng: np.random.Generator, replicates: bool = True,
           seeds: bool = True) -> Dict[str, np.ndarray]:
    """Indices of one nested bootstrap: replicates [B, R], seeds [B, S], examples [B, n]."""
    first = evaluations[0]
    return {"replicates": rng.integers(len(evaluations), size=(resamples, len(evaluations))) if replicates
            else np.broadcast_to(np.arange(len(evaluations)), (resamples, len(evaluations))),
            "seeds": rng.integers(first.seeds, size=(resamples, first.seeds)) if seeds and first.seeds > 1
            else np.broadcast_to(np.arange(first.seeds), (resamples, first.seeds)),
            "examples": rng.integers(first.examples, size=(resamples, first.examples))}


def _resampled_means(evaluations: Sequence[Scores], draws: Dict[str, np.ndarray]) -> np.ndarray:
    """[B] the mean over the drawn replicates of each replicate's value on the drawn seeds and examples."""
    values = np.stack([e.value(draws["seeds"], draws["examples"]) for e in evaluations], axis=1)   # [B, R]
    return np.take_along_axis(values, draws["replicates"], axis=1).mean(1)


def _anova(per_seed: np.ndarray) -> Dict[str, Optional[float]]:
    """Replicate and seed components of per-seed values [R, S] (balanced nested ANOVA, method of moments)."""
    replicates, seeds = per_seed.shape
    seed_var = float(per_seed.var(axis=1, ddof=1).mean()) if seeds > 1 else None
    replicate_var = None
    if replicates > 1:
        replicate_var = max(0.0, float(per_seed.mean(1).var(ddof=1)) - (seed_var or 0.0) / seeds)
    return {"replicate": replicate_var, "seed": seed_var}


def components(evaluations: Sequence[Scores], resamples: int = RESAMPLES, seed: int = 0) -> Dict[str, Optional[float]]:
    """Variance components (method of moments, see the module): ``replicate`` (between pretraining runs),
    ``seed`` (between seeds within a run), ``examples`` (of a mean over the n examples); None where the
    design has one level only (R = 1, S = 1)."""
    draws = _draws(evaluations, resamples, np.random.default_rng(seed), replicates=False, seeds=False)
    return {**_anova(_per_seed(evaluations)), "examples": float(np.var(_resampled_means(evaluations, draws)))}


def _shares(parts: Dict[str, Optional[float]], replicates: int, seeds: int) -> Dict[str, Optional[float]]:
    """Each component's share of the variance of a mean over R replicates and S seeds."""
    weighted = {"replicate": None if parts["replicate"] is None else parts["replicate"] / replicates,
                "seed": None if parts["seed"] is None else parts["seed"] / (replicates * seeds),
                "examples": parts["examples"]}
    total = sum(v for v in weighted.values() if v is not None)
    return {k: (None if v is None or total <= 0 else v / total) for k, v in weighted.items()}


def _interval(values: np.ndarray, level: float) -> tuple:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def method_text(replicates: int, seeds: int, level: float, resamples: int = RESAMPLES) -> str:
    parts = [f"{replicates} pretraining replicates" if replicates > 1 else "one pretraining run (not resampled)",
             f"{seeds} seeds" if seeds > 1 else "one seed (not resampled)", "evaluation examples"]
    return f"{round(100 * level)}% nested percentile bootstrap ({resamples} resamples) over " + ", then ".join(parts)


def estimate(evaluations: Sequence[Scores], level: float = 0.95, higher_is_better: bool = True, seed: int = 0,
             resamples: int = RESAMPLES) -> Dict:
    """Mean over replicates and seeds with its nested bootstrap interval and variance components."""
    level = check_level(level)
    _check_same(evaluations)
    per_seed = _per_seed(evaluations)
    means = _resampled_means(evaluations, _draws(evaluations, resamples, np.random.default_rng(seed)))
    low, high = _interval(means, level)
    parts = components(evaluations, resamples, seed)
    first = evaluations[0]
    return {"mean": float(per_seed.mean()), "low": low, "high": high, "se": float(means.std(ddof=1)),
            "level": level, "higher_is_better": higher_is_better, "metric": first.metric,
            "per_replicate": per_seed.mean(1).tolist(), "per_seed": per_seed.mean(0).tolist(),
            "replicates": len(evaluations), "seeds": first.seeds, "n": first.examples, "components": parts,
            "shares": _shares(parts, len(evaluations), first.seeds),
            "method": method_text(len(evaluations), first.seeds, level, resamples)}


@functools.lru_cache(maxsize=None)
def _effect_size(replicates: int, alpha: float) -> float:
    from statsmodels.stats.power import TTestPower

    return float(TTestPower().solve_power(nobs=replicates, alpha=alpha, power=POWER, alternative="two-sided"))


def detectable(sd_difference: Optional[float], replicates: int, level: float = 0.95,
               family: int = 1) -> Optional[float]:
    """The difference a two-sided one-sample/paired t-test on ``replicates`` replicate-mean differences of
    SD ``sd_difference`` finds with power ``POWER`` (statsmodels, noncentral t) at alpha = (1 - level) /
    ``family``: the Bonferroni level, which Benjamini-Hochberg over a family of that size never falls
    below, so the power holds for a lone difference among the family's."""
    if sd_difference is None or replicates < 2:
        return None
    return _effect_size(int(replicates), (1.0 - level) / family) * sd_difference


def _replicate_test(a: np.ndarray, b: np.ndarray, level: float) -> Optional[Dict]:
    """The replicate-level t-test of replicate means ``a`` [Ra] minus ``b`` [Rb] (see the module)."""
    if len(a) == len(b) and len(a) > 1:
        result, name = scipy_stats.ttest_rel(a, b), "paired t-test on replicate means (scipy.stats.ttest_rel)"
    elif len(b) == 1 and len(a) > 1:
        result, name = scipy_stats.ttest_1samp(a, b[0]), ("one-sample t-test of the replicate means against the "
                                                         "reference evaluated once (scipy.stats.ttest_1samp)")
    elif len(a) == 1 and len(b) > 1:
        result, name = scipy_stats.ttest_1samp(-b, -a[0]), ("one-sample t-test of the replicate means against the "
                                                           "reference evaluated once (scipy.stats.ttest_1samp)")
    elif len(a) > 1 and len(b) > 1:
        result, name = scipy_stats.ttest_ind(a, b, equal_var=False), \
            "Welch t-test on replicate means (scipy.stats.ttest_ind)"
    else:
        return None
    low, high = result.confidence_interval(level)
    p = float(result.pvalue)
    return {"p_value": 1.0 if np.isnan(p) else p, "t_low": float(low), "t_high": float(high), "test": name,
            "df": float(result.df)}


def compare(a: Sequence[Scores], b: Sequence[Scores], level: float = 0.95, seed: int = 0,
            resamples: int = RESAMPLES) -> Dict:
    """``a`` minus ``b`` (each a list of replicate evaluations on the same seeds and examples): difference,
    nested bootstrap interval, replicate-level test (p_value, its interval t_low/t_high; None below 2
    replicates), variance components of the difference and the smallest detectable difference."""
    level = check_level(level)
    _check_same([*a, *b])
    if a[0].gold is not None and not np.array_equal(a[0].gold, b[0].gold):
        raise ValueError("scores: expected both models evaluated on the same examples, got different gold labels")
    paired = len(a) == len(b)
    rng = np.random.default_rng(seed)
    draws_a = _draws(a, resamples, rng)
    draws_b = draws_a if paired else {**draws_a, "replicates": _draws(b, resamples, rng)["replicates"]}
    boot = _resampled_means(a, draws_a) - _resampled_means(b, draws_b)
    low, high = _interval(boot, level)
    seeds_a, seeds_b = _per_seed(a), _per_seed(b)
    out = {"difference": float(seeds_a.mean() - seeds_b.mean()), "low": low, "high": high,
           "se": float(boot.std(ddof=1)), "level": level, "replicates": [len(a), len(b)], "paired": paired,
           "interval": method_text(max(len(a), len(b)), a[0].seeds, level, resamples)}
    if paired:
        difference = seeds_a - seeds_b
        draws = _draws(a, resamples, np.random.default_rng(seed), replicates=False, seeds=False)
        parts = {**_anova(difference),
                 "examples": float(np.var(_resampled_means(a, draws) - _resampled_means(b, draws)))}
        out["components"] = parts
        sd = None if parts["replicate"] is None else float(np.sqrt(parts["replicate"] + (parts["seed"] or 0.0)
                                                                   / a[0].seeds))
        out["sd_replicate_difference"] = sd
    tested = _replicate_test(seeds_a.mean(1), seeds_b.mean(1), level)
    out.update(tested or {"p_value": None, "t_low": None, "t_high": None, "test": None, "df": None})
    return out


def replicates_needed_text(level: float = 0.95) -> str:
    """Why R < MIN_REPLICATES makes no call, and what R buys (the t-test's detectable difference in SDs)."""
    sizes = ", ".join(f"R = {r}: {_effect_size(r, 1 - level):.2f}" for r in (3, 5, 10))
    return (f"A call needs at least {MIN_REPLICATES} pretraining replicates per arm (train.replicates={MIN_REPLICATES} "
            f"or --replicates {MIN_REPLICATES}): a verdict must hold across pretraining runs (initialisation, data "
            "order, masks), whose variance one run per arm cannot measure, and with 2 the t-test has one degree of "
            f"freedom. Smallest difference found with power {POWER} at level {1 - level:.2g}, in SDs of a "
            f"replicate's difference between the arms: {sizes}.")


def verdicts(comparisons: List[Dict], higher_is_better: Sequence[bool], level: float = 0.95) -> List[Dict]:
    """Adds ``p_adjusted`` (Benjamini-Hochberg over the comparisons that have a replicate-level test) and
    ``verdict``: 'better' / 'worse' when the adjusted p-value is below 1 - level and every compared arm has
    at least MIN_REPLICATES replicates, 'no detectable difference' when it has them and is not, and
    'no call (R = k)' below."""
    alpha = 1.0 - check_level(level)
    tested = [i for i, c in enumerate(comparisons) if c.get("p_value") is not None]
    adjusted = dict(zip(tested, scipy_stats.false_discovery_control([comparisons[i]["p_value"] for i in tested],
                                                                     method="bh"))) if tested else {}
    out = []
    for i, (comparison, higher) in enumerate(zip(comparisons, higher_is_better)):
        p = adjusted.get(i)
        fewest = min(r for r in comparison["replicates"] if r > 1) if max(comparison["replicates"]) > 1 else 1
        if fewest < MIN_REPLICATES:
            verdict = f"no call (R = {fewest})"
        elif p is not None and p < alpha:
            verdict = "better" if (comparison["difference"] > 0) == bool(higher) else "worse"
        else:
            verdict = "no detectable difference"
        size = detectable(comparison.get("sd_replicate_difference"), min(comparison["replicates"]), level,
                          max(len(tested), 1))
        out.append({**comparison, "p_adjusted": None if p is None else float(p), "verdict": verdict,
                    "min_detectable": size})
    return out
