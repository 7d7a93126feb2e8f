"""Uncertainty for evaluation scores: intervals, paired tests, detectable differences, verdicts.

Every evaluation in kdfast ends as ``Scores``: the predictions of S seeds (fine-tuning or probe
seeds) on the same n evaluation examples, and one metric that turns predictions into a number.

- ``estimate``: the mean over seeds, with a percentile bootstrap interval that resamples seeds
  *and* evaluation examples (``scipy.stats.bootstrap``, two independent samples: the seed indices
  and the example indices; with one seed only the examples are resampled).
- ``paired_comparison``: two models on the same examples and seeds. The difference of their means,
  its bootstrap interval (the same resampled seeds and examples for both), a two-sided paired
  permutation test over examples (``scipy.stats.permutation_test``, ``permutation_type="samples"``:
  under the null the two models' predictions on an example are exchangeable), and the minimum
  detectable difference ``(z_{1-alpha/2} + z_{power}) * SE`` of that difference.
- ``verdicts``: Benjamini-Hochberg across a family of comparisons
  (``scipy.stats.false_discovery_control``), then better / worse / no detectable difference. A
  difference is called only when the adjusted permutation p-value is below 1 - level *and* the
  interval of the difference excludes 0. The permutation test holds the seeds fixed (it resamples
  examples only), so with fine-tuning seeds that disagree (one seed at the majority class, another
  at 75%) it alone would call differences the seeds do not support; the interval resamples them.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from scipy import stats

from kdfast.eval import metrics

POWER = 0.8
RESAMPLES = 1000


@dataclass
class Scores:
    """``predictions`` [S, n] (classes, regression scores or per-example losses) of S seeds on n
    examples; ``gold`` [n] or None for per-example values; ``metric`` a name in ``kdfast.eval.metrics``."""

    predictions: np.ndarray
    gold: Optional[np.ndarray]
    metric: str

    def __post_init__(self):
        self.predictions = np.atleast_2d(np.asarray(self.predictions))
        if self.predictions.shape[1] < 2:
            raise ValueError(f"scores: expected at least 2 evaluation examples, got {self.predictions.shape[1]}")
        if self.gold is not None:
            self.gold = np.asarray(self.gold)
            if self.gold.shape != self.predictions.shape[1:]:
                raise ValueError(f"scores: expected gold of shape {self.predictions.shape[1:]}, got {self.gold.shape}")

    @property
    def seeds(self) -> int:
        return self.predictions.shape[0]

    @property
    def examples(self) -> int:
        return self.predictions.shape[1]

    def value(self, seeds: Optional[np.ndarray] = None, examples: Optional[np.ndarray] = None) -> np.ndarray:
        """The metric averaged over ``seeds`` [..., S'] (default all) on ``examples`` [..., n'] (default
        all; indices may repeat); leading axes are a batch of resamples. Returns [...] (0-dim: float)."""
        seeds = np.arange(self.seeds) if seeds is None else np.asarray(seeds)
        examples = np.arange(self.examples) if examples is None else np.asarray(examples)
        pred = self.predictions[seeds[..., :, None], examples[..., None, :]]          # [..., S', n']
        gold = None if self.gold is None else self.gold[examples][..., None, :]       # [..., 1, n']
        return metrics.compute(self.metric, pred, gold).mean(-1)


def _rng(function: Callable, seed: int) -> Dict:
    """The seeded generator under the keyword this SciPy takes (``rng`` from 1.15, ``random_state`` before)."""
    name = "rng" if "rng" in inspect.signature(function).parameters else "random_state"
    return {name: np.random.default_rng(seed)}


def check_level(level: float) -> float:
    """An interval level must lie in (0, 1)."""
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"level: expected an interval level in (0, 1) such as 0.95, got {level!r}")
    return float(level)


def _bootstrap(statistic: Callable[[np.ndarray, np.ndarray], float], seeds: int, examples: int, level: float,
               seed: int):
    """Percentile bootstrap of ``statistic(seed_indices, example_indices)``; seeds resampled when > 1."""
    samples = (np.arange(seeds), np.arange(examples)) if seeds > 1 else (np.arange(examples),)

    def wrapped(*indices, axis=-1):  # batched: each index array [B, size]
        return statistic(*indices) if seeds > 1 else statistic(np.arange(seeds), indices[0])

    return stats.bootstrap(samples, wrapped, paired=False, vectorized=True, n_resamples=RESAMPLES,
                           confidence_level=level, method="percentile", **_rng(stats.bootstrap, seed))


def method_text(scores: Scores, level: float) -> str:
    what = "seeds and evaluation examples" if scores.seeds > 1 else "evaluation examples (one seed)"
    return f"{round(100 * level)}% percentile bootstrap over {what}, {RESAMPLES} resamples"


def estimate(scores: Scores, level: float = 0.95, higher_is_better: bool = True, seed: int = 0) -> Dict:
    """Mean over seeds with its bootstrap interval, as a JSON-ready dict."""
    level = check_level(level)
    result = _bootstrap(scores.value, scores.seeds, scores.examples, level, seed)
    low, high = result.confidence_interval
    return {"mean": float(scores.value()), "low": float(low), "high": float(high), "se": float(result.standard_error),
            "level": level, "higher_is_better": higher_is_better, "metric": scores.metric,
            "per_seed": [float(scores.value(np.array([s]))) for s in range(scores.seeds)],
            "seeds": scores.seeds, "n": scores.examples, "method": method_text(scores, level)}


def paired_comparison(a: Scores, b: Scores, level: float = 0.95, seed: int = 0) -> Dict:
    """``a`` minus ``b`` on the same examples and seeds: difference, interval, permutation p-value and
    the smallest difference this evaluation could detect (two-sided alpha = 1 - level, power 0.8)."""
    level = check_level(level)
    if a.predictions.shape != b.predictions.shape or a.metric != b.metric:
        raise ValueError(f"scores: expected two evaluations of the same shape and metric, got "
                         f"{a.predictions.shape} {a.metric} and {b.predictions.shape} {b.metric}")
    if a.gold is not None and not np.array_equal(a.gold, b.gold):
        raise ValueError("scores: expected both models evaluated on the same examples, got different gold labels")
    n = a.examples
    diff = _bootstrap(lambda s, e: a.value(s, e) - b.value(s, e), a.seeds, n, level, seed)
    table = Scores(np.concatenate([a.predictions, b.predictions], axis=1),
                   None if a.gold is None else np.concatenate([a.gold, a.gold]), a.metric)

    def swapped(x: np.ndarray, y: np.ndarray, axis=-1) -> np.ndarray:  # [B, n]: copy a (i) or b (n + i) of each
        return table.value(examples=x) - table.value(examples=y)

    test = stats.permutation_test((np.arange(n), np.arange(n) + n), swapped, permutation_type="samples",
                                  vectorized=True, n_resamples=RESAMPLES, alternative="two-sided",
                                  **_rng(stats.permutation_test, seed))
    low, high = diff.confidence_interval
    se = float(diff.standard_error)
    alpha = 1.0 - level
    detectable = (stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(POWER)) * se
    return {"difference": float(a.value() - b.value()), "low": float(low), "high": float(high), "se": se,
            "p_value": float(test.pvalue), "min_detectable": float(detectable), "level": level,
            "test": f"paired permutation test over evaluation examples ({RESAMPLES} permutations, two-sided), "
                    f"Benjamini-Hochberg adjusted; a difference is called only when the adjusted p < {1 - level:.2g} "
                    f"and its interval excludes 0; interval: {method_text(a, level)}"}


def verdicts(comparisons: List[Dict], higher_is_better: Sequence[bool], level: float = 0.95) -> List[Dict]:
    """Adds ``p_adjusted`` (Benjamini-Hochberg over the family) and ``verdict`` to each comparison:
    'better' / 'worse' when the adjusted p-value is below 1 - level and the interval of the difference
    excludes 0, else 'no detectable difference'."""
    if not comparisons:
        return []
    adjusted = stats.false_discovery_control([c["p_value"] for c in comparisons], method="bh")
    alpha = 1.0 - check_level(level)
    out = []
    for comparison, p, higher in zip(comparisons, adjusted, higher_is_better):
        verdict = "no detectable difference"
        if p < alpha and (comparison["low"] > 0 or comparison["high"] < 0):
            verdict = "better" if (comparison["difference"] > 0) == bool(higher) else "worse"
        out.append({**comparison, "p_adjusted": float(p), "verdict": verdict})
    return out


def separated(a: Dict, b: Dict) -> bool:
    """Whether two estimates' intervals do not overlap."""
    return a["low"] > b["high"] or b["low"] > a["high"]
