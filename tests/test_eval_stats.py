"""Metrics against scikit-learn/SciPy; intervals, paired tests and verdicts: a planted effect is
detected, a null effect is not called, bad levels are refused."""
import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn import metrics as sk

from kdfast.eval import metrics, stats


def test_metrics_equal_sklearn_and_scipy_batched():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 300)
    pred = rng.integers(0, 2, (4, 300))
    x, y = rng.normal(size=(3, 200)), np.round(rng.normal(size=200), 1)  # ties in y
    for i in range(4):
        assert metrics.compute("mcc", pred, gold)[i] == pytest.approx(sk.matthews_corrcoef(gold, pred[i]), abs=1e-12)
        assert metrics.compute("f1", pred, gold)[i] == pytest.approx(sk.f1_score(gold, pred[i]), abs=1e-12)
        assert metrics.compute("accuracy", pred, gold)[i] == pytest.approx(sk.accuracy_score(gold, pred[i]))
    for i in range(3):
        assert metrics.compute("pearson", x, y)[i] == pytest.approx(scipy_stats.pearsonr(x[i], y)[0], abs=1e-12)
        assert metrics.compute("spearman", x, y)[i] == pytest.approx(scipy_stats.spearmanr(x[i], y)[0], abs=1e-12)
    three = rng.integers(0, 3, 100), rng.integers(0, 3, 100)
    assert metrics.compute("mcc", three[0], three[1]) == pytest.approx(sk.matthews_corrcoef(three[1], three[0]))
    assert metrics.compute("mcc", np.ones(5, int), np.array([0, 1, 1, 0, 1])) == 0.0
    assert metrics.compute("pearson", np.ones(5), np.arange(5.0)) == 0.0
    with pytest.raises(ValueError, match="metric: expected one of"):
        metrics.compute("auc", pred[0], gold)


def _noisy(gold, accuracy, seeds, rng):
    """Predictions of ``seeds`` seeds that are right with probability ``accuracy`` each."""
    return np.where(rng.random((seeds, gold.size)) < accuracy, gold, 1 - gold)


def test_planted_effect_is_detected_and_null_is_not_called():
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 2, 800)
    strong = stats.Scores(_noisy(gold, 0.80, 3, rng), gold, "accuracy")
    weak = stats.Scores(_noisy(gold, 0.65, 3, rng), gold, "accuracy")
    same = stats.Scores(strong.predictions.copy(), gold, "accuracy")
    a, b = stats.estimate(strong), stats.estimate(weak)
    assert a["low"] < a["mean"] < a["high"] and stats.separated(a, b)
    found, null = stats.paired_comparison(strong, weak), stats.paired_comparison(strong, same)
    assert found["low"] > 0 and found["p_value"] < 0.01 and found["min_detectable"] < found["difference"]
    assert null["difference"] == 0 and null["p_value"] > 0.5
    decided = stats.verdicts([found, null], [True, True])
    assert [d["verdict"] for d in decided] == ["better", "no detectable difference"]
    assert stats.verdicts([found], [False])[0]["verdict"] == "worse"  # a loss: higher is worse


def test_a_difference_carried_by_one_seed_is_not_called():
    """One fine-tuning seed learns (80%), two stay at the majority class, against a row that stays there
    on every seed: the permutation test over examples (seeds fixed) finds it, the seeds do not support it."""
    rng = np.random.default_rng(3)
    gold = np.r_[np.zeros(450, int), np.ones(422, int)]
    majority = np.zeros((3, gold.size), int)
    one_seed = np.stack([_noisy(gold, 0.8, 1, rng)[0], majority[1], majority[2]])
    comparison = stats.paired_comparison(stats.Scores(one_seed, gold, "accuracy"),
                                         stats.Scores(majority, gold, "accuracy"))
    assert comparison["p_value"] < 0.01 and comparison["difference"] > 0.05 and comparison["low"] <= 0
    assert stats.verdicts([comparison], [True])[0]["verdict"] == "no detectable difference"


def test_two_independent_draws_of_the_same_model_are_not_called():
    rng = np.random.default_rng(2)
    gold = rng.integers(0, 2, 500)
    calls = [stats.verdicts([stats.paired_comparison(stats.Scores(_noisy(gold, 0.7, 3, rng), gold, "accuracy"),
                                                     stats.Scores(_noisy(gold, 0.7, 3, rng), gold, "accuracy"),
                                                     seed=k)], [True])[0]["verdict"] for k in range(10)]
    assert calls.count("no detectable difference") >= 8  # alpha = 0.05: at most a rare false call


def test_interval_covers_the_truth_and_shrinks_with_examples():
    rng = np.random.default_rng(3)
    widths = []
    for n in (200, 3200):
        gold = rng.integers(0, 2, n)
        e = stats.estimate(stats.Scores(_noisy(gold, 0.75, 3, rng), gold, "accuracy"))
        assert e["low"] <= 0.75 <= e["high"]
        widths.append(e["high"] - e["low"])
    assert widths[1] < widths[0] / 2.5  # ~ 1/sqrt(n): 4x narrower for 16x the examples
    losses = stats.Scores(rng.normal(2.0, 0.5, size=(1, 400)), None, "mean")  # one seed: examples only
    e = stats.estimate(losses, higher_is_better=False)
    assert e["seeds"] == 1 and "one seed" in e["method"] and e["low"] < 2.0 < e["high"]


@pytest.mark.parametrize("level", [0, 1, 1.5, -0.1, "high", True])
def test_interval_level_outside_zero_one_is_refused(level):
    gold = np.array([0, 1, 1, 0])
    with pytest.raises(ValueError, match=r"level: expected an interval level in \(0, 1\)"):
        stats.estimate(stats.Scores(np.array([[0, 1, 0, 0]]), gold, "accuracy"), level)


def test_mismatched_comparisons_are_refused():
    gold = np.array([0, 1, 1, 0])
    a = stats.Scores(np.array([[0, 1, 0, 0]]), gold, "accuracy")
    with pytest.raises(ValueError, match="scores: expected two evaluations of the same shape"):
        stats.paired_comparison(a, stats.Scores(np.array([[0, 1, 0]]), gold[:3], "accuracy"))
    with pytest.raises(ValueError, match="scores: expected both models evaluated on the same examples"):
        stats.paired_comparison(a, stats.Scores(np.array([[0, 1, 0, 0]]), 1 - gold, "accuracy"))
