"""The shared training step (kdfast/train/step.py) and the op probe it times kd losses with."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import kdfast
from kdfast.budget.observe import observe_ops
from kdfast.train.step import PHASES, TrainStep

VOCAB, LENGTH = 37, 9


class ToyKD(nn.Module):
    """A strategy with the kdfast.strategies interface: frozen teacher, vocab KD + MLM via a kdfast op."""

    def __init__(self):
        super().__init__()
        self.teacher = nn.Sequential(nn.Embedding(VOCAB, 12), nn.Linear(12, 12))
        self.teacher_head = nn.Linear(12, VOCAB)
        self.teacher.requires_grad_(False)
        self.teacher_head.requires_grad_(False)
        self.student = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.Tanh())
        self.student_head = nn.Linear(8, VOCAB)

    def teacher_pass(self, batch):
        return self.teacher(batch["input_ids"]).flatten(0, 1)

    def student_pass(self, batch, taps):
        hidden = self.student(batch["input_ids"]).flatten(0, 1)
        out = kdfast.fused_linear_kd(hidden, self.student_head.weight, taps, self.teacher_head.weight,
                                     self.student_head.bias, self.teacher_head.bias,
                                     labels=batch["labels"].flatten(), mlm_weight=0.5, reduction="sum")
        return SimpleNamespace(loss=out.loss, parts={"kd": out.kd}, mlm_loss=out.mlm)

    def trainable_parameters(self):
        return list(self.student.parameters()) + list(self.student_head.parameters())


def make_batch(rows: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, LENGTH), generator=g)
    labels = torch.where(torch.rand(rows, LENGTH, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
            "labels": labels}


def split(batch: dict) -> list[dict]:
    half = batch["input_ids"].shape[0] // 2
    return [{k: v[:half] for k, v in batch.items()}, {k: v[half:] for k, v in batch.items()}]


def sgd_step(model: ToyKD, batches, **options):
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    return TrainStep(model, optimizer, batches, device="cpu", **options)()


def test_step_equals_the_manual_update():
    model = ToyKD()
    manual = copy.deepcopy(model)
    batch = make_batch(4, 1)
    result = sgd_step(model, [batch], grad_clip=None)

    out = manual.student_pass(batch, manual.teacher_pass(batch))
    out.loss.backward()
    with torch.no_grad():
        for p in manual.trainable_parameters():
            p -= 0.1 * p.grad
    assert torch.allclose(result.loss, out.loss.detach())
    assert result.tokens == 4 * LENGTH and result.grad_norm is None and result.phase_ms is None
    for p, q in zip(model.trainable_parameters(), manual.trainable_parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert all(p.grad is None for p in model.trainable_parameters())


def test_accumulation_of_two_halves_equals_one_batch_step():
    # With a summed loss, accumulation (loss / 2 per half) gives half the full-batch gradient.
    model = ToyKD()
    twin = copy.deepcopy(model)
    batch = make_batch(6, 2)
    whole = sgd_step(model, [batch], grad_clip=None)
    halves = TrainStep(twin, torch.optim.SGD(twin.trainable_parameters(), lr=0.2), split(batch), device="cpu",
                       grad_clip=None, accumulation=2)()
    assert halves.tokens == whole.tokens
    for p, q in zip(model.trainable_parameters(), twin.trainable_parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_grad_clipping_reports_the_unclipped_norm():
    model = ToyKD()
    result = sgd_step(model, [make_batch(4, 3)], grad_clip=1e-3)
    assert result.grad_norm is not None and float(result.grad_norm) > 1e-3


def test_timing_reports_every_phase_and_leaves_the_update_unchanged():
    model = ToyKD()
    twin = copy.deepcopy(model)
    batch = make_batch(4, 4)
    timed = sgd_step(model, lambda: batch, timing=True)
    plain = sgd_step(twin, lambda: batch)
    assert set(timed.phase_ms) == set(PHASES)
    assert all(v >= 0 for v in timed.phase_ms.values())
    assert timed.phase_ms["kd_loss"] > 0
    assert torch.equal(timed.loss, plain.loss)
    for p, q in zip(model.trainable_parameters(), twin.trainable_parameters()):
        assert torch.equal(p, q)


def test_probe_sees_forward_and_backward_and_keeps_gradients():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(VOCAB, 8, requires_grad=True)
    teacher, teacher_weight = torch.randn(5, 6), torch.randn(VOCAB, 6)
    labels = torch.tensor([1, -100, 3, 4, -100])

    def loss():
        return kdfast.fused_linear_kd(hidden, weight, teacher, teacher_weight, labels=labels, mlm_weight=1.0)

    expected = torch.autograd.grad(loss().loss, (hidden, weight))
    seen = []

    def observer(op, direction, kwargs):
        seen.append((op, direction))
        return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)

    with observe_ops(observer):
        out = loss()
        got = torch.autograd.grad(out.loss, (hidden, weight))
    assert seen == [("fused_linear_kd", "forward"), ("fused_linear_kd", "backward")]
    assert isinstance(out, kdfast.KDOutput)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-6)


def test_bad_step_options_name_the_argument():
    model = ToyKD()
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    with pytest.raises(ValueError, match="accumulation: expected an int >= 1, got 0"):
        TrainStep(model, optimizer, [], device="cpu", accumulation=0)
    with pytest.raises(ValueError, match="grad_clip: expected None or a number > 0, got -1"):
        TrainStep(model, optimizer, [], device="cpu", grad_clip=-1)
