"""Linear probes on frozen features (scikit-learn), one ``Scores`` per probing task.

Per task and probe seed: the seed splits the task's pool into train and dev; a standardised
logistic regression (``sklearn.linear_model.LogisticRegression``, L2) is fitted on train for each C
in ``C_GRID``, the C with the best dev accuracy is kept, and its predictions on the fixed test split
are the seed's predictions. Pair tasks use [u, v, |u - v|, u * v] of the two sentences' features
(the SentEval/InferSent pair encoding); token-level tasks the state of the word's first word-piece.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kdfast.eval import features
from kdfast.eval.probe_tasks import ProbeTask
from kdfast.eval.stats import Scores

C_GRID = (0.01, 0.1, 1.0)
METHOD = (f"logistic regression (scikit-learn, L2, standardised features, C in {list(C_GRID)} chosen on dev) "
          f"on frozen features: {features.POOLING}")


def _matrix(task: ProbeTask, features: Dict[str, np.ndarray], words: Dict[str, np.ndarray]) -> np.ndarray:
    """[n, F] features of every example of ``task`` (``words``: per-word states, token-level tasks)."""
    if task.token_level:
        return np.stack([words[sentence][i] for sentence, i in task.texts])
    if not task.pair:
        return np.stack([features[t[0]] for t in task.texts])
    u = np.stack([features[t[0]] for t in task.texts])
    v = np.stack([features[t[1]] for t in task.texts])
    return np.concatenate([u, v, np.abs(u - v), u * v], axis=1)


def fit_predict(x: np.ndarray, y: np.ndarray, task: ProbeTask, seed: int) -> np.ndarray:
    """Test-split predictions [n_test] of the probe of ``seed`` (C chosen on its dev split)."""
    train, dev = task.split(seed)
    best, best_accuracy = None, -1.0
    for c in C_GRID:
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500, random_state=seed))
        probe.fit(x[train], y[train])
        accuracy = float((probe.predict(x[dev]) == y[dev]).mean())
        if accuracy > best_accuracy:
            best, best_accuracy = probe, accuracy
    return best.predict(x[task.test])


def probe_scores(features: Dict[str, np.ndarray], tasks: Sequence[ProbeTask], seeds: Sequence[int],
                 words: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, Scores]:
    """{task name: Scores of the test predictions [seeds, n_test] (accuracy)} for given features."""
    out = {}
    for task in tasks:
        x, y = _matrix(task, features, words or {}), np.asarray(task.labels)
        predictions = np.stack([fit_predict(x, y, task, seed) for seed in seeds])
        out[task.name] = Scores(predictions, y[task.test], "accuracy")
    return out


def texts_of(tasks: Sequence[ProbeTask]) -> List[str]:
    """The distinct sentences of the sentence-level tasks."""
    return sorted({text for task in tasks if not task.token_level for example in task.texts for text in example})


def evaluate(model_path: str, tasks: Sequence[ProbeTask], seeds: Sequence[int], device: torch.device,
             max_length: int = 64) -> Dict[str, Scores]:
    """Every probing task on the frozen encoder saved at ``model_path``."""
    model, tokenizer = features.load_encoder(model_path, device)
    pooled = features.sentence_features(model, tokenizer, texts_of(tasks), device, max_length)
    sentences = sorted({sentence for task in tasks if task.token_level for sentence, _ in task.texts})
    words = features.word_features(model, tokenizer, sentences, device, max_length) if sentences else {}
    return probe_scores(pooled, tasks, seeds, words)
