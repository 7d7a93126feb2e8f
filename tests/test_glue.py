"""GLUE metrics against scipy/numpy formulas, task folders, and the fine-tuning path on shared data."""
import json

import numpy as np
import pytest
import torch

from kdfast.eval import glue, glue_tasks, metrics


def test_metrics_match_independent_formulas():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=200), rng.normal(size=200)
    y_tied = np.round(y, 1)
    assert metrics.pearson(x, y) == pytest.approx(scipy_stats.pearsonr(x, y)[0], abs=1e-12)
    assert metrics.spearman(x, y_tied) == pytest.approx(scipy_stats.spearmanr(x, y_tied)[0], abs=1e-12)
    pred, gold = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    tp, tn = np.sum((pred == 1) & (gold == 1)), np.sum((pred == 0) & (gold == 0))
    fp, fn = np.sum((pred == 1) & (gold == 0)), np.sum((pred == 0) & (gold == 1))
    mcc = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert metrics.matthews(pred, gold) == pytest.approx(mcc, abs=1e-12)
    assert metrics.f1(pred, gold) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert metrics.matthews(np.ones(5), np.array([0, 1, 1, 0, 1])) == 0.0
    assert set(metrics.score("mrpc", pred, gold)) == {"f1", "accuracy"}
    assert set(metrics.score("stsb", x, y)) == {"pearson", "spearman"}


def test_glue_dir_missing_a_split_is_refused(tmp_path):
    (tmp_path / "cola").mkdir()
    (tmp_path / "cola" / "train.jsonl").write_text(json.dumps({"sentence": "a b", "label": 1}) + "\n")
    with pytest.raises(ValueError, match=r"glue_dir: expected cola/validation.jsonl in .*, got no such file"):
        glue_tasks.check_dir(str(tmp_path), glue_tasks.parse_tasks("cola"))
    with pytest.raises(ValueError, match="tasks: expected names among"):
        glue_tasks.parse_tasks("cola,imdb")


@pytest.mark.slow
def test_glue_path_on_shared_tasks_gives_sane_metrics(shared_data, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from kdfast.data.tokenizer import build_wordpiece

    glue_dir = shared_data / "glue"
    texts = []
    for task in ("cola", "sst2", "stsb"):
        for row in glue_tasks.load_rows(glue_tasks.TASKS[task], "train", str(glue_dir)):
            texts += [row[c] for c in glue_tasks.TASKS[task].columns]
    tokenizer = build_wordpiece(texts, 3000, tmp_path / "model")
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=128))
    model.save_pretrained(str(tmp_path / "model"))
    results = glue.evaluate_model(str(tmp_path / "model"), glue_tasks.parse_tasks("cola,sst2,stsb"), str(glue_dir),
                                  seeds=[0], lrs=[1e-3], batch_sizes=[16], epochs=3, seq_len=64,
                                  device=torch.device("cpu"), max_train_examples=1000, max_eval_examples=300)
    assert set(results) == {"cola", "sst2", "stsb"}
    assert -1.0 <= results["cola"]["metrics"]["mcc"] <= 1.0
    assert results["sst2"]["metrics"]["accuracy"] > 0.55          # above chance after 3 short epochs
    assert 0.0 < results["stsb"]["metrics"]["pearson"] <= 1.0
    assert -1.0 <= results["stsb"]["metrics"]["spearman"] <= 1.0
    assert all(r["spread"] >= 0 and len(r["grid"][0]["runs"]) == 1 for r in results.values())
    assert 0.0 < glue.average(results) < 1.0
