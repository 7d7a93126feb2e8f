"""kdfast.eval.nested: calibration by simulation (no training), R = 1 without calls, bad input.

Synthetic arms: per-example values (metric ``mean``) y[r, s, i] = mu + u_r + w_rs + e_i + eps_rsi with a
pretraining-replicate effect u_r ~ N(0, SD_REPLICATE^2) drawn afresh for every arm and replicate, a seed
effect w_rs, an example effect e_i shared by every arm and replicate (the same evaluation set) and noise.
"""
import numpy as np
import pytest

from kdfast.eval import nested, stats
from kdfast.train import replicates

SD_REPLICATE, SD_SEED, SD_EXAMPLE, SD_NOISE = 0.05, 0.01, 0.3, 0.3
R, S, N = 3, 2, 60
ARMS, METRICS = 3, 2            # each simulated comparison: 3 arms against a baseline on 2 metrics
SIMULATIONS = 200


def _arm(rng, examples, shift=0.0, replicates=R):
    """One arm's replicate evaluations (list of Scores [S, N])."""
    out = []
    for _ in range(replicates):
        values = (shift + rng.normal(0, SD_REPLICATE) + rng.normal(0, SD_SEED, (S, 1)) + examples
                  + rng.normal(0, SD_NOISE, (S, N)))
        out.append(stats.Scores(values, None, "mean"))
    return out


def _sd_difference():
    """SD of a replicate-mean difference between two arms under the simulation's model."""
    return float(np.sqrt(2 * SD_REPLICATE ** 2 + 2 * SD_SEED ** 2 / S + 2 * SD_NOISE ** 2 / (S * N)))


def _simulate(shift, method, rng, simulations=SIMULATIONS):
    """Fraction of (arm, metric) pairs called over SIMULATIONS comparisons, each a BH family of
    ARMS x METRICS pairs; ``method`` 'nested' (this module) or 'today' (stats: one run per arm, resampling
    seeds and examples only)."""
    called = total = 0
    for _ in range(simulations):
        family = []
        for _ in range(METRICS):
            examples = rng.normal(0, SD_EXAMPLE, N)
            base = _arm(rng, examples)
            for _ in range(ARMS):
                arm = _arm(rng, examples, shift)
                family.append(nested.compare(arm, base, resamples=20) if method == "nested"
                              else stats.paired_comparison(arm[0], base[0]))
        judged = (nested.verdicts if method == "nested" else stats.verdicts)(family, [True] * len(family))
        called += sum(v["verdict"] in ("better", "worse") for v in judged)
        total += len(judged)
    return called / total


def test_calibration_null_power_and_todays_method(monkeypatch):
    rng = np.random.default_rng(0)
    null = _simulate(0.0, "nested", rng)
    assert null <= 0.05, f"nested: {null:.3f} of null pairs called"
    planted = nested.detectable(_sd_difference(), R, family=ARMS * METRICS)   # the report's stated size
    power = _simulate(planted, "nested", rng)
    assert power >= 0.80, f"nested: planted {planted:.3f} found in {power:.3f} of pairs"
    monkeypatch.setattr(stats, "RESAMPLES", 200)              # today's method, cheaper but the same test
    today = _simulate(0.0, "today", rng, simulations=40)
    assert today > 2 * 0.05, f"today's method called {today:.3f} of null pairs"
    print(f"calibration: null {null:.3f}, power at {planted:.3f}: {power:.3f}, today's null {today:.3f}")


def test_one_replicate_makes_no_call_and_says_what_r_needs():
    rng = np.random.default_rng(1)
    examples = rng.normal(0, SD_EXAMPLE, N)
    one = [nested.compare(_arm(rng, examples, 1.0, 1), _arm(rng, examples, 0.0, 1))]   # a huge difference
    judged = nested.verdicts(one, [True])
    assert judged[0]["verdict"] == "no call (R = 1)" and judged[0]["p_value"] is None
    assert judged[0]["low"] > 0                                # the interval is still reported
    text = nested.replicates_needed_text()
    assert "at least 3 pretraining replicates" in text and "R = 3:" in text


def test_estimate_components_recover_the_simulated_split():
    rng = np.random.default_rng(2)
    examples = rng.normal(0, SD_EXAMPLE, N)
    result = nested.estimate(_arm(rng, examples, replicates=40), resamples=200)
    parts = result["components"]
    assert parts["replicate"] == pytest.approx(SD_REPLICATE ** 2, rel=0.6)
    assert parts["examples"] == pytest.approx((SD_EXAMPLE ** 2 + SD_NOISE ** 2 / (40 * S)) / N, rel=0.5)
    assert result["low"] < result["mean"] < result["high"] and result["replicates"] == 40


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_bad_replicate_counts(bad):
    with pytest.raises(ValueError, match="train.replicates: expected an integer >= 1"):
        replicates.check_replicates(bad)


def test_replicates_above_the_cap():
    with pytest.raises(ValueError, match="train.replicates: expected at most 5"):
        replicates.check_replicates(6, cap=5)
    assert replicates.check_replicates(5, cap=5) == 5
