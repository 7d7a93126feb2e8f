"""A metric's trend across budgets, and where two strategies' trends cross.

A series is one strategy's cells for one metric: budgets ``x`` (> 0, in the budget's unit), cell means
``y`` and their standard errors ``se``. Two forms, both fitted by weighted least squares
(weights 1/se; ``scipy.linalg.lstsq``, and ``scipy.optimize.minimize_scalar`` for the power's exponent):

- ``log-linear``: ``y = a + b·ln(x / x0)`` (two parameters; any number of budgets >= 2);
- ``power``: ``y = c + a·(x / x0)^(-alpha)``, ``alpha`` in (0, 4] (saturating; used from 4 budgets).

``x0`` is the geometric mean of the series' budgets (conditioning only). Each series takes the power law
only when it lowers the AIC (chi-square + 2 x parameters) below the log-linear fit's. The crossing of two series is
the first sign change of the difference of their fits, on 256 points of ``ln x`` over the budgets both
series cover, refined by ``scipy.optimize.brentq``. Its interval is a bootstrap. With pretraining
replicates (``replicates`` [n, R], the same R >= 2 in both series) each draw resamples R replicate indices
with replacement, the same ones for every cell of both series (replicate r of every cell shares its seed),
and takes the means of the drawn replicates; without, every cell is redrawn from ``N(mean, se)``. Both
series are refitted and the crossing is found again; the percentiles of the crossings give the interval.
Fewer than half the draws crossing in range reads "no crossover in range".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from scipy.linalg import lstsq
from scipy.optimize import brentq, minimize_scalar

FORMS = {"log-linear": "y = a + b·ln(x/x0)", "power": "y = c + a·(x/x0)^(-alpha), 0 < alpha <= 4"}
POWER_FROM = 4                  # budgets needed before the saturating form is tried
GRID = 256
ALPHA = (1e-3, 4.0)             # the power law's exponent range


@dataclass(frozen=True)
class Series:
    """One strategy's cells: budgets ``x`` [n], means ``y`` [n] (over replicates), standard errors ``se`` [n],
    and optionally each replicate's mean ``replicates`` [n, R]."""

    x: np.ndarray
    y: np.ndarray
    se: np.ndarray
    replicates: Optional[np.ndarray] = None

    @classmethod
    def of(cls, x, y, se, replicates=None) -> "Series":
        x, y = np.asarray(x, float), np.asarray(y, float)
        se = np.asarray(se, float)
        if x.ndim != 1 or len(x) < 2 or x.shape != y.shape or x.shape != se.shape or np.any(x <= 0):
            raise ValueError(f"series: expected >= 2 budgets > 0 with a mean and SE each, got x={x}, y={y}, se={se}")
        if replicates is not None:
            replicates = np.asarray(replicates, float)
            if replicates.ndim != 2 or replicates.shape[0] != len(x):
                raise ValueError(f"series: expected replicates of shape [{len(x)}, R], got {replicates.shape}")
        floor = 1e-6 * max(float(np.max(np.abs(y))), 1e-12)  # a cell without spread still gets a weight
        return cls(x, y, np.maximum(np.nan_to_num(se, nan=0.0), floor), replicates)

    def shifted(self, by: float) -> "Series":
        """The same cells charged ``by`` more budget each (a teacher's cost)."""
        return Series(self.x + by, self.y, self.se, self.replicates)

    def redrawn(self, rng: np.random.Generator) -> "Series":
        return Series(self.x, rng.normal(self.y, self.se), self.se)

    def resampled(self, indices: np.ndarray) -> "Series":
        """The cells' means over the replicates ``indices`` [R] (drawn with replacement)."""
        return Series(self.x, self.replicates[:, indices].mean(1), self.se)


def replicate_count(*series: Series) -> int:
    """R when every series has the same R >= 2 replicates per cell, else 0 (the parametric bootstrap)."""
    counts = {None if s.replicates is None else s.replicates.shape[1] for s in series}
    count = counts.pop() if len(counts) == 1 else None
    return count if count is not None and count >= 2 else 0


@dataclass(frozen=True)
class Fit:
    """A fitted trend: ``form`` (a key of FORMS), ``params`` by name, ``x0``, weighted ``chi2``."""

    form: str
    params: dict
    x0: float
    chi2: float = 0.0

    def __call__(self, x) -> np.ndarray:
        u = np.asarray(x, float) / self.x0
        p = self.params
        if self.form == "log-linear":
            return p["a"] + p["b"] * np.log(u)
        return p["c"] + p["a"] * u ** (-p["alpha"])

    def describe(self) -> str:
        values = ", ".join(f"{k}={v:.4g}" for k, v in self.params.items())
        return f"{FORMS[self.form]} with {values}, x0={self.x0:.4g}"


def choose(series: Series) -> Fit:
    """The log-linear fit, or the power law when there are POWER_FROM budgets and its AIC is lower."""
    linear = fit(series, "log-linear")
    if len(series.x) < POWER_FROM:
        return linear
    power = fit(series, "power")
    return power if power.chi2 + 2 * len(power.params) < linear.chi2 + 2 * len(linear.params) else linear


def _weighted_lstsq(columns: list, series: Series) -> tuple:
    """(coefficients, chi-square) of ``y ~ columns @ coef`` weighted by 1/se."""
    design = np.stack(columns, axis=1) / series.se[:, None]
    target = series.y / series.se
    coef = lstsq(design, target)[0]
    return coef, float(np.sum((design @ coef - target) ** 2))


def fit(series: Series, form: str) -> Fit:
    """Weighted least-squares fit of ``form``. The power law is linear in (c, a) for a fixed alpha, so
    alpha is found by ``scipy.optimize.minimize_scalar`` on the profiled chi-square (variable projection)."""
    if form not in FORMS:
        raise ValueError(f"form: expected one of {', '.join(FORMS)}, got {form!r}")
    x0 = float(np.exp(np.mean(np.log(series.x))))
    u = series.x / x0
    ones = np.ones_like(u)
    if form == "log-linear":
        (a, b), chi2 = _weighted_lstsq([ones, np.log(u)], series)
        return Fit(form, {"a": float(a), "b": float(b)}, x0, chi2)
    alpha = minimize_scalar(lambda p: _weighted_lstsq([ones, u ** -p], series)[1], bounds=ALPHA,
                            method="bounded").x
    (c, a), chi2 = _weighted_lstsq([ones, u ** -alpha], series)
    return Fit(form, {"c": float(c), "a": float(a), "alpha": float(alpha)}, x0, chi2)


def crossing(first: Callable, second: Callable, low: float, high: float) -> Optional[float]:
    """The smallest x in [low, high] where ``first(x) - second(x)`` changes sign, or None."""
    grid = np.exp(np.linspace(np.log(low), np.log(high), GRID))
    difference = first(grid) - second(grid)
    changes = np.flatnonzero(np.sign(difference[:-1]) * np.sign(difference[1:]) < 0)
    exact = np.flatnonzero(difference == 0)
    if exact.size and (not changes.size or exact[0] <= changes[0]):
        return float(grid[exact[0]])
    if not changes.size:
        return None
    i = changes[0]
    root = brentq(lambda u: float(first(np.exp(u)) - second(np.exp(u))), np.log(grid[i]), np.log(grid[i + 1]))
    return float(np.exp(root))


def _bootstrap_kind(base: Series, other: Series) -> str:
    replicates = replicate_count(base, other)
    return f"{replicates} pretraining replicates resampled, paired" if replicates else "parametric, N(mean, SE)"


def crossover(base: Series, other: Series, forms: Optional[tuple] = None, draws: int = 1000,
              level: float = 0.95, seed: int = 0) -> dict:
    """Where ``other``'s trend crosses ``base``'s within the budgets both cover; ``forms`` (base's,
    other's) default to ``choose`` on the means and stay fixed over the bootstrap draws.

    Returns ``range`` [low, high], ``forms``, ``estimate`` (from the fits to the means; without a sign
    change there, the draws' median when most draws cross), ``low``/``high`` (``level`` percentile interval
    over the draws that cross), ``crossing_fraction``, ``draws``, ``other_minus_base`` at both ends of the
    range (fitted to the means) with ``ends_low``/``ends_high`` (its percentile interval over the draws),
    and ``verdict``: "crossover" (most draws cross, and the difference is resolved from zero with opposite
    signs at the two ends), "crossover not resolved" (most draws cross, but an end's interval holds zero:
    the curves are within their noise) or "no crossover in range"."""
    forms = forms or (choose(base).form, choose(other).form)
    low, high = max(base.x.min(), other.x.min()), min(base.x.max(), other.x.max())
    result = {"range": [float(low), float(high)], "forms": list(forms),
              "method": f"fits {FORMS[forms[1]]} (strategy) and {FORMS[forms[0]]} (baseline), weighted least squares "
              f"(weights 1/cell SE); crossing interval: bootstrap of the cells ({_bootstrap_kind(base, other)}), "
              f"{draws} draws, "
              f"{100 * level:g}% percentile", "draws": draws, "estimate": None, "low": None, "high": None,
              "crossing_fraction": 0.0, "verdict": "no crossover in range", "other_minus_base": None}
    if low >= high:
        result["verdict"] = "no crossover in range (the series share no budget range)"
        return result
    ends = np.array([low, high])
    base_fit, other_fit = fit(base, forms[0]), fit(other, forms[1])
    result["other_minus_base"] = [float(v) for v in other_fit(ends) - base_fit(ends)]
    result["estimate"] = crossing(other_fit, base_fit, low, high)
    rng = np.random.default_rng(seed)
    found, differences = [], []
    replicates = replicate_count(base, other)
    for _ in range(draws):
        if replicates:
            drawn = rng.integers(replicates, size=replicates)
            base_draw, other_draw = fit(base.resampled(drawn), forms[0]), fit(other.resampled(drawn), forms[1])
        else:
            base_draw, other_draw = fit(base.redrawn(rng), forms[0]), fit(other.redrawn(rng), forms[1])
        found.append(crossing(other_draw, base_draw, low, high))
        differences.append(other_draw(ends) - base_draw(ends))
    found = np.array([x for x in found if x is not None])
    tail = 100 * (1 - level) / 2
    bounds = np.percentile(np.array(differences), [tail, 100 - tail], axis=0)        # [2 (low/high), 2 (ends)]
    result["ends_low"], result["ends_high"] = bounds[0].tolist(), bounds[1].tolist()
    result["crossing_fraction"] = len(found) / draws
    if result["crossing_fraction"] >= 0.5:
        result["low"], result["high"] = (float(v) for v in np.percentile(found, [tail, 100 - tail]))
        resolved = bool(np.all(bounds[0] * bounds[1] > 0) and bounds[0][0] * bounds[0][1] < 0)
        result["verdict"] = "crossover" if resolved else "crossover not resolved"
        if result["estimate"] is None:  # the means' fits just miss; most redrawn fits cross
            result["estimate"] = float(np.median(found))
    return result
