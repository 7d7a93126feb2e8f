"""Triton vocabulary KD (row kernel, fused_linear_kd, kd_kl) against float64 formulas written here.

Runs on CPU tensors under TRITON_INTERPRET=1. ``block_size`` is shrunk so that small vocabularies
still take several chunks, the last one partial.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import needs_triton_interpreter

pytestmark = needs_triton_interpreter

TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
KINDS = ("kl", "soft_ce")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


@pytest.fixture
def small_blocks(monkeypatch):
    """Chunks of 64 columns, so V=300 runs 5 chunks with a partial last one."""
    from kdfast.triton import vocab_kd

    monkeypatch.setattr(vocab_kd, "block_size", lambda vocab: (64, 4))


# ---------------------------------------------------------------------------------------------
# float64 formulas
# ---------------------------------------------------------------------------------------------

def row_terms64(s, t, labels, temperature, kind):
    """Per row: KD value, MLM value (lse(s) - s_y, 0 without label), q - p and softmax(s) - onehot."""
    s, t = s.double(), t.double()
    log_q = torch.log_softmax(s / temperature, -1)
    log_p = torch.log_softmax(t / temperature, -1)  # -inf teacher entries: p = 0
    p = log_p.exp()
    cross = torch.where(p > 0, p * log_q, torch.zeros_like(p)).sum(-1)
    entropy = torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)
    kd = entropy - cross if kind == "kl" else -cross
    labelled = labels >= 0
    onehot = torch.zeros_like(s)
    onehot[labelled, labels[labelled]] = 1.0
    lse = torch.logsumexp(s, -1)
    s_y = s.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    mlm = torch.where(labelled, lse - s_y, torch.zeros_like(lse))
    d_mlm = torch.where(labelled[:, None], torch.softmax(s, -1) - onehot, torch.zeros_like(s))
    return kd, mlm, log_q.exp() - p, d_mlm


def vocab_kd64(sh, sw, th, tw, sb, tb, labels, ignore_index, temperature, kd_weight, mlm_weight, kind,
               reduction, t2_scale, mask, row_weights, teacher_topk):
    """fused_linear_kd in float64 with autograd (loss, kd, mlm)."""
    s = sh.double() @ sw.double().T + (0 if sb is None else sb.double())
    t = th.double() @ tw.double().T + (0 if tb is None else tb.double())
    vocab = s.shape[1]
    keep = mask if mask is not None else (torch.ones(len(s), dtype=torch.bool) if labels is None
                                          else labels != ignore_index)
    t = t.detach()
    if teacher_topk is not None:
        kth = t.topk(teacher_topk, -1).values[:, -1:]
        t = t.masked_fill(t < kth, float("-inf"))
    kd_rows, _, _, _ = row_terms64(s[keep], t[keep], torch.full((int(keep.sum()),), -1), temperature, kind)
    if row_weights is not None:
        kd_rows = kd_rows * row_weights[keep].double()
    kept = int(keep.sum())
    divisor = {"sum": 1.0, "batchmean": max(kept, 1), "mean": max(kept * vocab, 1)}[reduction]
    kd = kd_rows.sum() * (temperature ** 2 if t2_scale else 1.0) / divisor
    mlm = s.sum() * 0
    if labels is not None and mlm_weight:
        lab = labels != ignore_index
        _, mlm_rows, _, _ = row_terms64(s[lab], s[lab], labels[lab], 1.0, "kl")
        mlm = mlm_rows.sum() / (1.0 if reduction == "sum" else max(int(lab.sum()), 1))
    return kd_weight * kd + mlm_weight * mlm, kd, mlm


# ---------------------------------------------------------------------------------------------
# row kernel
# ---------------------------------------------------------------------------------------------

def run_rows(s, t, labels, kd_coef, mlm_coef, temperature, kind):
    from kdfast.triton.vocab_kd import rows

    grad = s.clone()
    kd_row, mlm_row = rows(grad, t, labels, kd_coef, mlm_coef, temperature, kind == "soft_ce")
    return grad, kd_row, mlm_row


def check_rows(s, t, labels, temperature, kind, tol=1e-5):
    count = s.shape[0]
    kd_coef = torch.rand(count) + 0.5
    mlm_coef = torch.rand(count) + 0.5
    grad, kd_row, mlm_row = run_rows(s, t, labels, kd_coef, mlm_coef, temperature, kind)
    kd, mlm, d_kd, d_mlm = row_terms64(s, t, labels, temperature, kind)
    ref_grad = kd_coef.double()[:, None] * d_kd + mlm_coef.double()[:, None] * d_mlm
    assert rel_err(kd_row, kd) < tol
    assert rel_err(grad, ref_grad) < tol
    if (labels >= 0).any():
        assert rel_err(mlm_row, mlm) < tol
    assert torch.equal(mlm_row[labels < 0], torch.zeros(int((labels < 0).sum())))


def random_labels(count, vocab):
    labels = torch.randint(0, vocab, (count,))
    labels[::3] = -1
    return labels


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind", KINDS)
def test_rows_match_float64(small_blocks, temperature, kind):
    count, vocab = 6, 300
    s, t = torch.randn(count, vocab) * 3, torch.randn(count, vocab) * 3
    check_rows(s, t, random_labels(count, vocab), temperature, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_extreme_logits(small_blocks, kind):
    count, vocab = 4, 300
    s, t = torch.randn(count, vocab) * 80, torch.randn(count, vocab) * 80
    s[0, 7], t[1, 250], s[2, 299], t[3, 0] = 3e4, 3e4, -3e4, -3e4
    check_rows(s, t, random_labels(count, vocab), 0.5, kind)


@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_rows_teacher_topk_minus_inf(small_blocks, temperature):
    count, vocab = 5, 300
    s, t = torch.randn(count, vocab), torch.randn(count, vocab)
    kth = t.topk(5, -1).values[:, -1:]
    t = t.masked_fill(t < kth, float("-inf"))
    t[0, :200] = float("-inf")  # whole chunks of -inf, including the first ones
    t[0, 210] = 1.0
    for kind in KINDS:
        check_rows(s, t, random_labels(count, vocab), temperature, kind)


def test_rows_default_block_and_no_rows():
    from kdfast.triton.vocab_kd import rows

    s, t = torch.randn(3, 2500), torch.randn(3, 2500)  # two default chunks of 2048
    check_rows(s, t, torch.tensor([5, -1, 2499]), 2.0, "kl")
    empty = torch.empty(0, 10)
    kd_row, mlm_row = rows(empty, empty, torch.empty(0, dtype=torch.long), torch.empty(0), torch.empty(0), 1.0,
                           False)
    assert kd_row.shape == mlm_row.shape == (0,)
