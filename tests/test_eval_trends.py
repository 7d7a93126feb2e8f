"""Trend fits and crossovers: a planted crossing is recovered; parallel curves read "no crossover in range"."""
import numpy as np
import pytest

from kdfast.eval import trends

BUDGETS = np.array([50.0, 150.0, 450.0, 1350.0, 4050.0])


def _series(y, se=0.01, budgets=BUDGETS):
    return trends.Series.of(budgets, y, np.full(len(budgets), se))


@pytest.mark.parametrize("count", [3, 5])        # the power law is tried from 4 budgets (AIC keeps log-linear)
def test_planted_crossover_is_recovered_with_an_interval(count):
    budgets = BUDGETS[:count] if count == 5 else np.array([50.0, 400.0, 3200.0])
    truth = 400.0                               # no-kd rises faster: KD leads below 400, no-kd above
    base = _series(0.60 + 0.10 * np.log(budgets / truth), budgets=budgets)
    kd = _series(0.60 + 0.04 * np.log(budgets / truth), budgets=budgets)
    result = trends.crossover(base, kd, draws=300)
    assert result["forms"] == ["log-linear", "log-linear"]
    assert result["verdict"] == "crossover" and result["crossing_fraction"] > 0.9
    assert result["estimate"] == pytest.approx(truth, rel=0.15)
    assert result["low"] < truth < result["high"] and result["high"] / result["low"] < 3
    assert result["other_minus_base"][0] > 0 > result["other_minus_base"][1]


def test_parallel_curves_have_no_crossover_in_range():
    base = _series(0.5 + 0.05 * np.log(BUDGETS))
    kd = _series(0.6 + 0.05 * np.log(BUDGETS))
    result = trends.crossover(base, kd, draws=300)
    assert result["verdict"] == "no crossover in range" and result["crossing_fraction"] < 0.5
    assert result["estimate"] is None and result["low"] is None


def test_curves_within_their_noise_do_not_make_a_crossover():
    kd = _series(0.5 + 0.05 * np.log(BUDGETS) + np.array([0.004, -0.003, 0.002, -0.004, 0.003]), se=0.02)
    result = trends.crossover(_series(0.5 + 0.05 * np.log(BUDGETS), se=0.02), kd, draws=300)
    assert result["verdict"] != "crossover" and result["ends_low"][0] < 0 < result["ends_high"][0]


def test_teacher_charge_shift_moves_the_crossing_right():
    base = _series(0.60 + 0.10 * np.log(BUDGETS / 400))
    kd = _series(0.60 + 0.04 * np.log(BUDGETS / 400))
    plain = trends.crossover(base, kd, draws=100)
    charged = trends.crossover(base, kd.shifted(20.0), draws=100)
    assert charged["range"][0] == 70.0 and charged["estimate"] < plain["estimate"]  # KD is worse when charged


def test_saturating_curve_is_fitted_by_the_power_law():
    y = 2.0 + 3.0 * (BUDGETS / 450) ** -0.7
    result = trends.choose(_series(y, 1e-3))
    assert result.form == "power" and result(BUDGETS) == pytest.approx(y, rel=1e-3)
    assert result.params["alpha"] == pytest.approx(0.7, rel=0.02) and "c + a" in result.describe()
    assert trends.choose(_series(y[:3], 1e-3, BUDGETS[:3])).form == "log-linear"        # too few budgets to try it


def test_series_needs_two_budgets():
    with pytest.raises(ValueError, match="series: expected >= 2 budgets"):
        trends.Series.of([10.0], [1.0], [0.1])


def test_crossover_interval_resamples_replicates_and_widens_with_their_spread():
    """With replicates, each draw resamples them (paired across cells and series); replicate spread that the
    cell SEs do not show widens the crossing interval."""
    budgets, truth = np.array([50.0, 400.0, 3200.0]), 400.0
    rng = np.random.default_rng(0)

    def replicated(slope, spread):
        means = 0.60 + slope * np.log(budgets / truth)
        reps = means[:, None] + rng.normal(0, spread, (len(budgets), 3))
        return trends.Series.of(budgets, reps.mean(1), np.full(3, 0.001), reps)

    tight = trends.crossover(replicated(0.10, 0.001), replicated(0.04, 0.001), draws=200)
    loose = trends.crossover(replicated(0.10, 0.03), replicated(0.04, 0.03), draws=200)
    assert "3 pretraining replicates resampled" in tight["method"]
    assert tight["verdict"] == "crossover" and tight["estimate"] == pytest.approx(truth, rel=0.1)
    assert tight["low"] <= tight["estimate"] <= tight["high"]
    assert loose["high"] / loose["low"] > 2 * tight["high"] / tight["low"] or loose["verdict"] != "crossover"
    with pytest.raises(ValueError, match=r"series: expected replicates of shape \[3, R\]"):
        trends.Series.of(budgets, np.zeros(3), np.ones(3), np.zeros((2, 3)))
