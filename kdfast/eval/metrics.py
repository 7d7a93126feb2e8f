"""GLUE metrics on plain Python/NumPy arrays (no scikit-learn needed)."""
from __future__ import annotations

from typing import Dict

import numpy as np


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float((pred == gold).mean())


def f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """F1 of the positive class (label 1)."""
    tp = float(((pred == 1) & (gold == 1)).sum())
    fp = float(((pred == 1) & (gold == 0)).sum())
    fn = float(((pred == 0) & (gold == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation of binary predictions (0 when a marginal is constant)."""
    tp = float(((pred == 1) & (gold == 1)).sum())
    tn = float(((pred == 0) & (gold == 0)).sum())
    fp = float(((pred == 1) & (gold == 0)).sum())
    fn = float(((pred == 0) & (gold == 1)).sum())
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else float((tp * tn - fp * fn) / denom)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return 0.0 if denom == 0 else float((x * y).sum() / denom)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_ranks(x), _ranks(y))


# task -> (metric names, the one used to pick hyper-parameters and average)
TASK_METRICS = {
    "cola": (("mcc",), "mcc"),
    "stsb": (("pearson", "spearman"), "pearson"),
    "mrpc": (("f1", "accuracy"), "f1"),
    "qqp": (("f1", "accuracy"), "f1"),
}
_FUNCTIONS = {"accuracy": accuracy, "f1": f1, "mcc": matthews, "pearson": pearson, "spearman": spearman}


def metric_names(task: str):
    return TASK_METRICS.get(task, (("accuracy",), "accuracy"))


def score(task: str, pred: np.ndarray, gold: np.ndarray) -> Dict[str, float]:
    """Every metric of ``task`` (predicted classes, or scores for STS-B) against gold labels."""
    names, _ = metric_names(task)
    return {name: _FUNCTIONS[name](np.asarray(pred), np.asarray(gold)) for name in names}
