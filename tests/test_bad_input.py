"""Every public loss rejects bad input with a message naming the argument, what was expected and what came."""
from __future__ import annotations

import re

import pytest
import torch

import kdfast


def raises(exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc, match=pattern):
        fn(*args, **kwargs)


def logits(n=4, v=6):
    return torch.randn(n, v), torch.randn(n, v)


def heads(b=2, h=2, length=5, ds=4, dt=6):
    return (torch.randn(b, h, length, ds), torch.randn(b, h, length, ds),
            torch.randn(b, h, length, dt), torch.randn(b, h, length, dt))


def heads_lm(n=4, v=6, h_s=3, h_t=5):
    return torch.randn(n, h_s), torch.randn(v, h_s), torch.randn(n, h_t), torch.randn(v, h_t)


# ---- kd_kl ------------------------------------------------------------------------------------------------

def test_kd_kl_shape_mismatch():
    raises(ValueError, re.escape("teacher_logits: expected shape [N, V] of student_logits = (4, 6), got (4, 7)"),
           kdfast.kd_kl, torch.randn(4, 6), torch.randn(4, 7))


def test_kd_kl_wrong_rank_and_dtype():
    raises(ValueError, r"student_logits: expected 2 dimensions, got shape \(4,\)", kdfast.kd_kl,
           torch.randn(4), torch.randn(4))
    raises(TypeError, r"student_logits: expected dtype in .*float32.*, got torch.int64", kdfast.kd_kl,
           torch.ones(4, 6, dtype=torch.long), torch.randn(4, 6))
    raises(TypeError, r"teacher_logits: expected a torch.Tensor, got list", kdfast.kd_kl, torch.randn(2, 2),
           [[0.0, 1.0], [1.0, 0.0]])


def test_kd_kl_non_finite():
    s, t = logits()
    t[1, 2] = float("nan")
    raises(ValueError, r"teacher_logits: expected finite values \(no NaN/inf\), got 1 non-finite entries",
           kdfast.kd_kl, s, t)
    s[0, 0] = float("inf")
    raises(ValueError, r"student_logits: expected finite values", kdfast.kd_kl, s, torch.randn(4, 6))


def test_finite_check_sees_every_bad_entry_and_no_overflow():
    """The check screens with a sum: huge finite values whose sum overflows must pass, and NaN, +inf
    and -inf (also +inf next to -inf) must fail."""
    huge = torch.full((4, 6), 3e38)
    assert not torch.isfinite(huge.sum())
    kdfast.kd_kl(huge, huge.clone())  # no error
    for bad in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        t = torch.randn(4, 6)
        t.view(-1)[: len(bad)] = torch.tensor(bad)
        raises(ValueError, rf"teacher_logits: expected finite values \(no NaN/inf\), got {len(bad)} non-finite",
               kdfast.kd_kl, torch.randn(4, 6), t)


def test_kd_kl_options():
    s, t = logits()
    raises(ValueError, r"temperature: expected a finite number > 0, got 0", kdfast.kd_kl, s, t, temperature=0)
    raises(ValueError, r"temperature: expected a finite number > 0, got -1.0", kdfast.kd_kl, s, t, temperature=-1.0)
    raises(ValueError, r"kind: expected one of 'kl', 'soft_ce', 'reverse_kl', 'jsd', got 'js'", kdfast.kd_kl, s, t,
           kind="js")
    raises(ValueError, r"reduction: expected one of 'batchmean', 'sum', 'mean', got 'none'", kdfast.kd_kl, s, t,
           reduction="none")


def test_kd_kl_mask_shape_and_values():
    s, t = logits()
    raises(ValueError, r"mask: expected shape \[N\] = \(4,\), got \(5,\)", kdfast.kd_kl, s, t,
           mask=torch.ones(5, dtype=torch.bool))
    raises(ValueError, r"mask: expected only 0/1 \(or bool\) entries, got other values", kdfast.kd_kl, s, t,
           mask=torch.tensor([0, 1, 2, 1]))


def test_wrong_device_is_named():
    s = torch.randn(4, 6)
    raises(ValueError, r"teacher_logits: expected the device of student_logits \(cpu\), got meta", kdfast.kd_kl,
           s, torch.empty(4, 6, device="meta"))


# ---- fused_linear_kd --------------------------------------------------------------------------------------

def test_fused_linear_kd_shape_errors():
    hs, ws, ht, wt = heads_lm()
    raises(ValueError, r"student_weight: expected shape \[V, Hs\] matching student_hidden's Hs", kdfast.fused_linear_kd,
           hs, torch.randn(6, 4), ht, wt)
    raises(ValueError, r"teacher_weight: expected shape \[V, Ht\] with the V of student_weight", kdfast.fused_linear_kd,
           hs, ws, ht, torch.randn(7, 5))
    raises(ValueError, r"teacher_hidden: expected shape \[N, Ht\] with the N of student_hidden",
           kdfast.fused_linear_kd, hs, ws, torch.randn(3, 5), wt)
    raises(ValueError, r"student_bias: expected shape \[V\] = \(6,\), got \(5,\)", kdfast.fused_linear_kd,
           hs, ws, ht, wt, student_bias=torch.randn(5))


def test_fused_linear_kd_labels():
    hs, ws, ht, wt = heads_lm()
    raises(ValueError, r"labels: expected values in \[0, 6\) or ignore_index=-100, got label 6",
           kdfast.fused_linear_kd, hs, ws, ht, wt, labels=torch.tensor([0, 6, -100, 1]))
    raises(ValueError, r"labels: expected values in \[0, 6\) or ignore_index=-100, got label -3",
           kdfast.fused_linear_kd, hs, ws, ht, wt, labels=torch.tensor([0, -3, -100, 1]))
    raises(TypeError, r"labels: expected dtype in \(torch.int64, torch.int32\), got torch.float32",
           kdfast.fused_linear_kd, hs, ws, ht, wt, labels=torch.zeros(4))
    raises(ValueError, r"labels: expected a \[N\] label tensor because mlm_weight=1.0, got None",
           kdfast.fused_linear_kd, hs, ws, ht, wt, mlm_weight=1.0)


def test_fused_linear_kd_values_and_dtypes():
    hs, ws, ht, wt = heads_lm()
    bad = hs.clone()
    bad[0, 0] = float("nan")
    raises(ValueError, r"student_hidden: expected finite values", kdfast.fused_linear_kd, bad, ws, ht, wt)
    for name, position in (("student_weight", 1), ("teacher_weight", 3)):
        args = [hs, ws, ht, wt]
        args[position] = args[position].clone()
        args[position][2, 1] = float("inf")
        raises(ValueError, rf"{name}: expected finite values", kdfast.fused_linear_kd, *args)
    raises(ValueError, r"temperature: expected a finite number > 0, got 0.0", kdfast.fused_linear_kd, hs, ws, ht, wt,
           temperature=0.0)
    raises(TypeError, r"student_weight: expected the same dtype as student_hidden", kdfast.fused_linear_kd,
           hs, ws.double(), ht, wt)
    raises(ValueError, r"teacher_topk: expected None or an int in \[1, V=6\], got 0", kdfast.fused_linear_kd,
           hs, ws, ht, wt, teacher_topk=0)
    raises(ValueError, r"kd_weight: expected a finite number >= 0, got -1", kdfast.fused_linear_kd, hs, ws, ht, wt,
           kd_weight=-1)
    raises(ValueError, r"teacher_hidden: expected the device of student_hidden \(cpu\), got meta",
           kdfast.fused_linear_kd, hs, ws, torch.empty(4, 5, device="meta"), wt)


# ---- attention losses -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [kdfast.attention_kl, kdfast.attention_score_mse])
def test_attention_shape_errors(fn):
    qs, ks, qt, kt = heads()
    raises(ValueError, r"q_t: expected shape \[B, h, L, d_t\] with the B, h, L of q_s", fn, qs, ks,
           torch.randn(2, 2, 6, 6), kt)
    raises(ValueError, r"k_s: expected shape \[B, h, L, d_s\] equal to q_s", fn, qs, torch.randn(2, 2, 5, 3), qt, kt)
    raises(ValueError, r"q_s: expected 4 dimensions, got shape \(2, 5, 4\)", fn, qs[:, 0], ks, qt, kt)
    raises(ValueError, r"key_mask: expected shape \[B, L\] = \(2, 5\), got \(2, 4\)", fn, qs, ks, qt, kt,
           torch.ones(2, 4, dtype=torch.bool))
    nan = qt.clone()
    nan[0, 0, 0, 0] = float("nan")
    raises(ValueError, r"q_t: expected finite values", fn, qs, ks, nan, kt)


def test_relation_kl_errors():
    raises(ValueError, r"x_s: expected a width divisible by num_relation_heads=4, got width 6", kdfast.relation_kl,
           torch.randn(2, 5, 6), torch.randn(2, 5, 8), 4)
    raises(ValueError, r"x_t: expected a width divisible by num_relation_heads=4, got width 10", kdfast.relation_kl,
           torch.randn(2, 5, 8), torch.randn(2, 5, 10), 4)
    raises(ValueError, r"x_t: expected shape \[B, L, Ht\] with the B, L of x_s", kdfast.relation_kl,
           torch.randn(2, 5, 8), torch.randn(2, 6, 8), 4)
    raises(ValueError, r"num_relation_heads: expected a positive int, got 0", kdfast.relation_kl,
           torch.randn(2, 5, 8), torch.randn(2, 5, 8), 0)


def test_fully_masked_batch_row_is_excluded_not_nan():
    qs, ks, qt, kt = (x.requires_grad_(True) for x in heads())
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    loss = kdfast.attention_kl(qs, ks, qt, kt, mask, backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(qs.grad).all() and qs.grad[1].abs().sum() == 0
    none = kdfast.relation_kl(torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8), 2,
                              torch.zeros(2, 5, dtype=torch.bool), backend="torch")
    assert none.item() == 0


# ---- hidden_mse -------------------------------------------------------------------------------------------

def test_hidden_mse_errors():
    raises(ValueError, r"h_t: expected shape \[B, L, Hs\] \(no proj\)", kdfast.hidden_mse, torch.randn(2, 5, 3),
           torch.randn(2, 5, 4))
    raises(ValueError, r"proj.weight: expected shape \[Ht, Hs\] mapping h_s to h_t", kdfast.hidden_mse,
           torch.randn(2, 5, 3), torch.randn(2, 5, 4), torch.nn.Linear(3, 6))
    raises(TypeError, r"proj: expected None or torch.nn.Linear, got Conv1d", kdfast.hidden_mse,
           torch.randn(2, 5, 3), torch.randn(2, 5, 4), torch.nn.Conv1d(3, 4, 1))
    raises(ValueError, r"mask: expected shape \[B, L\] = \(2, 5\), got \(5,\)", kdfast.hidden_mse,
           torch.randn(2, 5, 3), torch.randn(2, 5, 3), None, torch.ones(5, dtype=torch.bool))
    raises(ValueError, r"h_s: expected finite values", kdfast.hidden_mse, torch.full((2, 5, 3), float("inf")),
           torch.randn(2, 5, 3))
