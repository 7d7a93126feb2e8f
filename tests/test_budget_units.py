"""Budget strings and their conversions (kdfast/budget/units.py)."""
from __future__ import annotations

import pytest

from kdfast.budget.units import Budget, Calibration, parse_budget

# Step costs shaped like a calibration of each strategy: (ms/step, tokens/step, FLOPs/step).
STRATEGY_COSTS = {
    "no-kd": (310.0, 32768, 9.3e15),
    "vanilla": (520.0, 32768, 1.53e16),
    "tinybert": (545.5, 32768, 1.6e16),
    "minilm_v2": (498.25, 32768, 1.5e16),
}


@pytest.mark.parametrize("text, amount, unit", [
    ("24h", 86400.0, "s"), ("90m", 5400.0, "s"), ("86400s", 86400.0, "s"), ("1.5d", 129600.0, "s"),
    ("3e18flop", 3e18, "flop"), ("4.6e9tok", 4.6e9, "tok"), (" 2.5E3 tokens ", 2500.0, "tok"),
    ("1e15FLOPS", 1e15, "flop"), ("30min", 1800.0, "s"),
])
def test_parse_accepted_forms(text, amount, unit):
    assert parse_budget(text) == Budget(amount, unit)


@pytest.mark.parametrize("text", ["", "24", "h", "24 hours", "-3h", "0s", "3e18", "1e9words", "nan h", "1..2h"])
def test_unparseable_budget_lists_the_accepted_forms(text):
    with pytest.raises(ValueError, match=r"budget: expected 24h, 90m, 86400s, 1\.5d, 3e18flop or 4\.6e9tok"):
        parse_budget(text)


def test_non_string_budget_is_a_type_error():
    with pytest.raises(TypeError, match="budget: expected a string"):
        parse_budget(24)


@pytest.mark.parametrize("strategy", sorted(STRATEGY_COSTS))
@pytest.mark.parametrize("world_size", [1, 8])
def test_time_tokens_time_round_trip(strategy, world_size):
    calibration = Calibration(*STRATEGY_COSTS[strategy], world_size=world_size)
    budget = parse_budget("24h")
    tokens = calibration.convert(budget, "tok")
    back = calibration.convert(tokens, "s")
    assert back.unit == "s" and back.amount == pytest.approx(budget.amount, rel=1e-12)
    flops = calibration.convert(tokens, "flop")
    assert calibration.convert(flops, "s").amount == pytest.approx(budget.amount, rel=1e-12)


def test_conversions_follow_the_step_cost():
    calibration = Calibration(ms_per_step=500.0, tokens_per_step=1000, flops_per_step=1e12, world_size=4)
    budget = parse_budget("1h")  # 3600 device-seconds = 900 s of wall clock on 4 ranks
    assert calibration.steps(budget) == pytest.approx(1800)
    assert calibration.whole_steps(budget) == 1800
    assert calibration.convert(budget, "tok").amount == pytest.approx(1800 * 4000)
    assert calibration.convert(budget, "flop").amount == pytest.approx(1800 * 4e12)
    assert calibration.wall_seconds(budget) == pytest.approx(900)
    assert calibration.whole_steps(parse_budget("4e12flop")) == 1


def test_budget_smaller_than_one_step():
    calibration = Calibration(ms_per_step=500.0, tokens_per_step=1000, flops_per_step=1e12)
    with pytest.raises(ValueError, match=r"budget: expected at least one step \(0\.5s of device time per step"):
        calibration.whole_steps(parse_budget("0.1s"))
    with pytest.raises(ValueError, match="budget: expected at least one step .* got 999 tokens"):
        calibration.whole_steps(parse_budget("999tok"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(ms_per_step=0.0, tokens_per_step=1, flops_per_step=1), "ms_per_step: expected a finite number > 0"),
    (dict(ms_per_step=1.0, tokens_per_step=-1, flops_per_step=1), "tokens_per_step: expected a finite number > 0"),
    (dict(ms_per_step=1.0, tokens_per_step=1, flops_per_step=float("inf")), "flops_per_step: expected"),
    (dict(ms_per_step=1.0, tokens_per_step=1, flops_per_step=1, world_size=0), "world_size: expected an int >= 1"),
])
def test_bad_calibration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Calibration(**kwargs)


def test_budget_value_checks_and_wording():
    with pytest.raises(ValueError, match="unit: expected one of s, flop, tok, got 'J'"):
        Budget(1.0, "J")
    with pytest.raises(ValueError, match="amount: expected a finite number > 0"):
        Budget(-1.0, "s")
    assert parse_budget("24h").describe() == "24h of device time"
    assert parse_budget("4.6e9tok").describe() == "4.6e+09 tokens"
