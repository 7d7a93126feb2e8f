"""Cached vanilla KD: with targets holding the whole teacher distribution it is live vanilla KD; its
step runs no teacher; a batch without targets is refused."""
from __future__ import annotations

import pytest
import torch
from strategy_fixtures import VOCAB, make_batch, tiny_config, tiny_teacher

from kdfast import models, strategies
from kdfast.models import ModelPlan, run_model


@pytest.fixture
def teacher():
    return tiny_teacher()


@pytest.mark.parametrize("name", list(strategies.CACHED))
@pytest.mark.parametrize("formulation", ["canonical", "paper"])
def test_full_distribution_targets_give_live_vanilla(teacher, name, formulation):
    torch.manual_seed(0)
    student = models.build_student(tiny_config(layers=2), teacher=teacher)
    live = strategies.build("vanilla", teacher, student, formulation=formulation).eval()
    cached = strategies.build(name, None, student, formulation=formulation).eval()
    assert not cached.uses_teacher and cached.teacher is None
    batch = make_batch()
    labelled = batch["labels"] != -100
    with torch.no_grad():
        p = torch.softmax(run_model(teacher, batch, ModelPlan(decoder=True)).logits(labelled), -1)
    targets = dict(teacher_ids=torch.arange(VOCAB).expand(p.shape[0], VOCAB), teacher_weights=p)
    want, got = live(batch), cached({**batch, **targets})
    assert torch.allclose(got.loss, want.loss, rtol=1e-5)
    assert set(got.parts) == set(want.parts)
    with pytest.raises(ValueError, match="expected cached teacher targets"):
        cached(batch)
