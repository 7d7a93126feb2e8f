"""FLOP accounting (kdfast/budget/flops.py): analytic formulas vs independent counts, kdfast op formulas."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel

import kdfast
from kdfast import _backends, strategies
from kdfast.budget import flops

BERT_BASE = flops.EncoderShape(12, 768, 12, 3072, 30522)
STUDENT_6L = flops.EncoderShape(6, 768, 12, 3072, 30522)


def test_study_anchor_vanilla_kd_tokens_vs_nokd():
    # The study: 2.6B tokens for KD vs 4.6B from scratch in equal time (BERT-base teacher, 6L/768, seq 128).
    nokd = flops.analytic_step_flops("no-kd", BERT_BASE, STUDENT_6L, 256, 128)["total"]
    vanilla = flops.analytic_step_flops("vanilla", BERT_BASE, STUDENT_6L, 256, 128)["total"]
    ratio = nokd / vanilla
    assert abs(ratio / (2.6 / 4.6) - 1) < 0.15
    assert ratio == pytest.approx(0.609, abs=0.002)  # the number docs/budget.md quotes


def test_encoder_forward_matches_flop_counter_on_a_bert_encoder():
    config = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                        vocab_size=50, max_position_embeddings=32, attn_implementation="eager")
    model = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, 50, (3, 16))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids)
    expected = flops.EncoderShape.of(config).encoder_forward(tokens=3 * 16, seq=16)
    assert counter.get_total_flops() == expected


def test_training_step_counts_three_forwards():
    shape = flops.EncoderShape(2, 32, 2, 64, 40)
    step = flops.analytic_step_flops("no-kd", shape, shape, batch=4, seq=8, mlm_probability=0.25)
    assert step["student"] == 3 * (shape.encoder_forward(32, 8) + shape.head_forward(8))
    assert step["teacher_forward"] == 0 and step["kd_loss"] == 0


@pytest.mark.parametrize("strategy", strategies.LIVE[1:])
def test_kd_strategies_charge_a_teacher_forward_and_loss_terms(strategy):
    step = flops.analytic_step_flops(strategy, BERT_BASE, STUDENT_6L, 32, 128)
    assert step["teacher_forward"] >= BERT_BASE.encoder_forward(32 * 128, 128)
    assert step["kd_loss"] > 0
    assert step["total"] == pytest.approx(step["student"] + step["teacher_forward"] + step["kd_loss"])


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="strategy: expected one of no-kd, vanilla"):
        flops.analytic_step_flops("bogus", BERT_BASE, STUDENT_6L, 1, 8)


def test_bert_base_parameter_count():
    assert flops.EncoderShape.of(BertConfig()).params == pytest.approx(109.5e6, rel=0.01)


def _op_inputs(op: str) -> tuple:
    """(public function call, tensors that need grad) on small odd shapes."""
    b, h, length, d_s, d_t = 2, 3, 7, 5, 6
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    if op == "kd_kl":
        s = torch.randn(11, 13, requires_grad=True)
        return lambda: kdfast.kd_kl(s, torch.randn(11, 13), mask=torch.arange(11) % 3 > 0), [s]
    if op == "fused_linear_kd":
        hid, w = torch.randn(11, 5, requires_grad=True), torch.randn(13, 5, requires_grad=True)
        labels = torch.where(torch.arange(11) % 2 == 0, torch.arange(11) % 13, torch.full((11,), -100))
        return (lambda: kdfast.fused_linear_kd(hid, w, torch.randn(11, 4), torch.randn(13, 4), labels=labels,
                                               mlm_weight=0.5).loss, [hid, w])
    if op in ("attention_kl", "attention_score_mse"):
        q, k = torch.randn(b, h, length, d_s, requires_grad=True), torch.randn(b, h, length, d_s, requires_grad=True)
        fn = getattr(kdfast, op)
        return lambda: fn(q, k, torch.randn(b, h, length, d_t), torch.randn(b, h, length, d_t), mask), [q, k]
    if op == "relation_kl":
        x = torch.randn(b, length, 6, requires_grad=True)
        return lambda: kdfast.relation_kl(x, torch.randn(b, length, 9), 3, mask), [x]
    hs, proj = torch.randn(b, length, 5, requires_grad=True), torch.nn.Linear(5, 6)
    return lambda: kdfast.hidden_mse(hs, torch.randn(b, length, 6), proj=proj, mask=mask), [hs, proj.weight]


@pytest.mark.parametrize("op", _backends.OPS)
def test_every_kdfast_op_counts_its_formula_forward_and_backward(op):
    call, leaves = _op_inputs(op)
    captured = {}
    original = _backends.call

    def spy(op_name, device, backend, **kwargs):
        captured.update(kwargs)
        return original(op_name, device, backend, **kwargs)

    _backends.call = spy
    try:
        call()
    finally:
        _backends.call = original
    fwd, bwd = flops.OP_FLOPS[op](captured)
    measured = flops.measure_flops(lambda: call().backward())
    assert fwd > 0 and bwd > 0
    assert measured["by_op"] == {f"kdfast_flops.{op}_forward": fwd, f"kdfast_flops.{op}_backward": bwd}
    assert measured["total"] == fwd + bwd
    assert _backends.call is original
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_score_formula_matmul_part_matches_the_counter_on_the_reference():
    # Without the probe FlopCounterMode sees the reference's own matmuls: exactly the formula's matmul part.
    b, h, length, d_s, d_t = 2, 3, 7, 5, 6
    q, k = torch.randn(b, h, length, d_s, requires_grad=True), torch.randn(b, h, length, d_s, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        kdfast.attention_kl(q, k, torch.randn(b, h, length, d_t), torch.randn(b, h, length, d_t),
                            backend="torch").backward()
    fwd, bwd = flops.score_pairs_flops(b * h, length, d_s, d_t, ew_fwd=0, ew_bwd=0)
    assert counter.get_total_flops() == fwd + bwd


def test_cpu_scaled_dot_product_attention_is_counted():
    q, k, v = (torch.randn(2, 3, 16, 8, requires_grad=True) for _ in range(3))
    measured = flops.measure_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    product = 2 * (2 * 3 * 16 * 16 * 8)  # one [16, 8] x [8, 16] product per batch and head
    # forward: QK^T, PV; backward: recomputed QK^T, dV, dP, dQ, dK
    assert measured["total"] == (2 + 5) * product


def test_pretraining_flops_follow_the_recipe():
    recipe = ((10, 4, 8), (2, 4, 16))
    expected = sum(steps * flops.analytic_step_flops("no-kd", STUDENT_6L, STUDENT_6L, batch, seq)["total"]
                   for steps, batch, seq in recipe)
    assert flops.pretraining_flops(STUDENT_6L, recipe) == expected
    assert 1e19 < flops.pretraining_flops(BERT_BASE) < 1e20
