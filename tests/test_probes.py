"""Probing tasks: deterministic for a seed, refused when the corpus is too small, and able to show a
planted effect (an encoder that sees word order beats one that does not on BShift) while calling
two identical encoders equal."""
import numpy as np
import pytest
import torch
from sklearn.feature_extraction.text import HashingVectorizer

from kdfast.data.corpus import BUILTIN_PYTHON_DOCS_HELDOUT, documents
from kdfast.eval import probe_tasks, probes, stats


@pytest.fixture(scope="module")
def docs():
    return list(documents([BUILTIN_PYTHON_DOCS_HELDOUT]))


def test_builders_are_deterministic_for_a_seed(docs):
    first = probe_tasks.build(docs, seed=3, test_size=300, pool_size=300)
    again = probe_tasks.build(docs, seed=3, test_size=300, pool_size=300)
    other = probe_tasks.build(docs, seed=4, test_size=300, pool_size=300)
    assert [t.name for t in first] == list(probe_tasks.TASK_NAMES)
    for a, b, c in zip(first, again, other):
        assert (a.texts, a.labels, a.test, a.pool) == (b.texts, b.labels, b.test, b.pool)
        assert a.texts != c.texts
        assert 200 <= len(a.test) <= 300 and 200 <= len(a.pool) <= 300 and not set(a.test) & set(a.pool)
        assert a.split(0) == b.split(0) and a.split(0) != a.split(1)
        assert 0 < a.chance < 0.6 and a.chance >= 1 / len(a.classes)
    bshift, _, _, adjacent, prevword, nextword = first
    assert not bshift.pair and adjacent.pair and set(bshift.labels) == {0, 1}
    assert prevword.token_level and not prevword.pair and all(isinstance(i, int) and i > 0 for _, i in prevword.texts)
    assert nextword.token_level and all(i < len(s.split()) - 1 for s, i in nextword.texts)
    for task, offset in ((prevword, -1), (nextword, 1)):  # the label is the word at the offset
        assert all(task.classes[label] == s.split()[i + offset].lower()
                   for (s, i), label in zip(task.texts, task.labels))


def test_a_corpus_too_small_is_refused_with_the_task_named():
    with pytest.raises(ValueError, match=r"probes: expected .* to give the 'bshift' task at least 200 test"):
        probe_tasks.build(["One short sentence here for you. Another one follows it now."], ["bshift"],
                          source="tiny.txt")
    with pytest.raises(ValueError, match="probes.tasks: expected names among"):
        probe_tasks.build(["text"], ["parse_depth"])


def _features(task, signal: float, seed: int = 0):
    """Bag-of-words features (blind to word order) of every text, plus, when ``signal`` > 0, one
    dimension that holds the BShift label with Gaussian noise of sd 1/signal: a known planted effect."""
    rng = np.random.default_rng(seed)
    vectorizer = HashingVectorizer(n_features=64, alternate_sign=False, norm="l2")
    label = {text[0]: y for text, y in zip(task.texts, task.labels)}
    texts = probes.texts_of([task])
    bag = vectorizer.transform(texts).toarray()
    planted = np.array([label[t] + rng.normal(0, 1 / signal) if signal else 0.0 for t in texts])
    return dict(zip(texts, np.concatenate([bag, planted[:, None]], axis=1).astype(np.float32)))


def test_planted_signal_is_detected_and_identical_encoders_tie(docs):
    tasks = probe_tasks.build(docs, ["bshift"], seed=0, test_size=600, pool_size=600)
    with_signal = probes.probe_scores(_features(tasks[0], 1.5), tasks, seeds=[0, 1])["bshift"]
    without = probes.probe_scores(_features(tasks[0], 0.0), tasks, seeds=[0, 1])["bshift"]
    twin = probes.probe_scores(_features(tasks[0], 0.0), tasks, seeds=[0, 1])["bshift"]
    a, b = stats.estimate(with_signal), stats.estimate(without)
    assert b["low"] < 0.56  # near chance: a bag of words cannot see a swap
    assert stats.separated(a, b) and a["mean"] > b["mean"] + 0.1
    calls = stats.verdicts([stats.paired_comparison(with_signal, without), stats.paired_comparison(twin, without)],
                           [True, True])
    assert [c["verdict"] for c in calls] == ["better", "no detectable difference"]


def test_frozen_encoder_probe_runs_on_a_saved_model(tmp_path, docs):
    from transformers import BertConfig, BertForMaskedLM

    from kdfast.data.tokenizer import build_wordpiece

    tokenizer = build_wordpiece(docs[:400], 500, tmp_path)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(str(tmp_path))
    tasks = probe_tasks.build(docs, ["sentlen", "adjacent"], test_size=200, pool_size=200)
    scores = probes.evaluate(str(tmp_path), tasks, [0, 1], torch.device("cpu"))
    assert set(scores) == {"sentlen", "adjacent"}
    assert all(s.predictions.shape == (2, 200) for s in scores.values())
    assert stats.estimate(scores["sentlen"])["mean"] > tasks[0].chance + 0.1  # length is visible even untrained


def test_suite_caches_predictions_per_model_and_reevaluates_a_retrained_one(tmp_path, docs, monkeypatch):
    import shutil

    from transformers import BertConfig, BertForMaskedLM

    from kdfast.data.tokenizer import build_wordpiece
    from kdfast.eval import suite

    model_dir = tmp_path / "model"
    tokenizer = build_wordpiece(docs[:300], 400, model_dir)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(str(model_dir))
    tasks = probe_tasks.build(docs, ["sentlen"], test_size=200, pool_size=200)
    config = {"eval": {"level": 0.9, "probe_seeds": [0, 1], "probe_max_length": 32}, "glue": None}
    evaluation_suite = suite.Suite(config, tasks, "held-out docs", None, None, 0, (), [])
    first = suite.evaluate(evaluation_suite, str(model_dir), torch.device("cpu"), tmp_path / "cache")
    calls = []
    monkeypatch.setattr(probes, "evaluate", lambda *a, **k: calls.append(1) or {})
    again = suite.evaluate(evaluation_suite, str(model_dir), torch.device("cpu"), tmp_path / "cache")
    assert not calls and np.array_equal(again.scores["probe/sentlen"].predictions,
                                        first.scores["probe/sentlen"].predictions)
    copied = tmp_path / "copied"
    shutil.copytree(model_dir, copied)  # new path and file times, same content: the cache holds
    suite.evaluate(evaluation_suite, str(copied), torch.device("cpu"), tmp_path / "cache")
    assert not calls
    torch.manual_seed(1)  # "retrained": other weights at the same path
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(str(model_dir))
    suite.evaluate(evaluation_suite, str(model_dir), torch.device("cpu"), tmp_path / "cache")
    assert calls == [1]
