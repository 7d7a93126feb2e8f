"""kdfast.strategies: every strategy builds, runs a step and back-propagates; bad input messages."""
from __future__ import annotations

import pytest
import torch
from strategy_fixtures import make_batch, tiny_config, tiny_teacher

from kdfast import models, strategies


@pytest.fixture
def teacher():
    return tiny_teacher()


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
