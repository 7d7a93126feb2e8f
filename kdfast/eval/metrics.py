"""Evaluation metrics by name, from scikit-learn and SciPy, batched over leading axes.

``compute(name, pred, gold)``: ``pred`` [..., n] predicted classes (accuracy, f1, mcc), regression
scores (pearson, spearman) or per-example values (``mean``: token losses, say; gold None), ``gold``
[..., n] broadcastable; returns [...]. The bootstrap and permutation tests call this on [B, S, n]
batches, so the binary metrics use vectorised identities of SciPy statistics (MCC of two binary
vectors is their Pearson correlation, the phi coefficient; Spearman is Pearson on ranks); other
cases (multi-class MCC, macro F1) loop over scikit-learn. Tests check each against scikit-learn/SciPy.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
from scipy import stats
from sklearn import metrics as sk

NAMES = ("accuracy", "f1", "mcc", "pearson", "spearman", "mean")
CLASSIFICATION = ("accuracy", "f1", "mcc")
REGRESSION = ("pearson", "spearman")


def _pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r along the last axis; 0 where either side is constant (r is undefined there)."""
    x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    constant = (np.ptp(x, axis=-1) == 0) | (np.ptp(y, axis=-1) == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = stats.pearsonr(x, y, axis=-1).statistic
    return np.where(constant, 0.0, np.nan_to_num(r))


def _each(function, pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    pred, gold = np.broadcast_arrays(pred, gold)
    flat = [function(g, p) for p, g in zip(pred.reshape(-1, pred.shape[-1]), gold.reshape(-1, gold.shape[-1]))]
    return np.asarray(flat, dtype=np.float64).reshape(pred.shape[:-1])


def _binary(*arrays: np.ndarray) -> bool:
    return all(np.isin(a, (0, 1)).all() for a in arrays)


def compute(name: str, pred: np.ndarray, gold: Optional[np.ndarray]) -> np.ndarray:
    """The metric ``name`` of ``pred`` [..., n] against ``gold`` [..., n]; shape [...]."""
    pred = np.asarray(pred)
    if name == "mean":
        return pred.mean(-1)
    if name not in NAMES:
        raise ValueError(f"metric: expected one of {', '.join(NAMES)}, got {name!r}")
    gold = np.asarray(gold)
    if name == "accuracy":
        return (pred == gold).mean(-1)
    if name == "pearson":
        return _pearson(pred, gold)
    if name == "spearman":
        return _pearson(stats.rankdata(pred, axis=-1), stats.rankdata(np.broadcast_to(gold, pred.shape), axis=-1))
    if name == "mcc":
        return _pearson(pred, gold) if _binary(pred, gold) else _each(sk.matthews_corrcoef, pred, gold)
    if _binary(pred, gold):  # F1 of class 1 = 2TP / (2TP + FP + FN), sklearn's f1_score (zero_division=0)
        tp = ((pred == 1) & (gold == 1)).sum(-1)
        wrong = (pred != gold).sum(-1)
        return np.where(tp == 0, 0.0, 2 * tp / np.maximum(2 * tp + wrong, 1))
    return _each(lambda g, p: sk.f1_score(g, p, zero_division=0.0, average="macro"), pred, gold)
