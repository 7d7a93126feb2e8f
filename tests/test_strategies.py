"""kdfast.strategies: every strategy builds, runs a step and back-propagates; bad input messages."""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from kdfast import models, strategies

VOCAB, L = 61, 13


def tiny_config(layers=4, hidden=32, heads=4, **kw) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=2 * hidden, max_position_embeddings=64, attention_probs_dropout_prob=0.0,
                      **kw)


@pytest.fixture
def teacher():
    return models.load_teacher(BertForMaskedLM(tiny_config()), device="cpu")


def make_batch(batch=2, length=L):
    ids = torch.randint(0, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 4:] = 0
    labels = torch.full((batch, length), -100)
    labels[:, 2] = ids[:, 2]
    labels[0, 5] = ids[0, 5]
    return dict(input_ids=ids, attention_mask=mask, labels=labels,
                token_type_ids=torch.zeros(batch, length, dtype=torch.long))


@pytest.mark.parametrize("name", strategies.LIVE)
@pytest.mark.parametrize("formulation", ["canonical", "paper"])
def test_every_strategy_steps(teacher, name, formulation):
    student = models.build_student(tiny_config(layers=2), teacher=teacher)
    strategy = strategies.build(name, teacher, student, formulation=formulation)
    out = strategy(make_batch())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in strategy.trainable_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in teacher.parameters())
    assert strategy.uses_teacher == (name != "no-kd")
