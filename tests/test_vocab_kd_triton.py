"""Triton vocabulary KD (row kernel, fused_linear_kd, kd_kl) against float64 formulas written here.

Runs on CPU tensors under TRITON_INTERPRET=1. ``block_size`` is shrunk so that small vocabularies
still take several chunks, the last one partial.
"""
from __future__ import annotations

import pytest
import torch
from conftest import needs_triton_interpreter

pytestmark = needs_triton_interpreter

TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
KINDS = ("kl", "soft_ce")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
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
    """fused_linear_kd in float64 with autograd (loss, kd, mlm); kd is 0 when kd_weight is 0."""
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
    kd = kd_rows.sum() * (temperature ** 2 if t2_scale else 1.0) / divisor * (kd_weight != 0)
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
    kd_row, mlm_row = rows(grad, t, labels, kd_coef, mlm_coef, temperature, kind)
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
                           "kl")
    assert kd_row.shape == mlm_row.shape == (0,)


# ---------------------------------------------------------------------------------------------
# fused_linear_kd and kd_kl with backend="triton"
# ---------------------------------------------------------------------------------------------

REDUCTIONS = ("batchmean", "sum", "mean")


def head_inputs(rows=12, hs=8, ht=12, vocab=300, dtype=torch.float32, bias=True):
    """Student/teacher hidden states and heads (student ones require grad), labels with ignored rows."""
    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(dtype).requires_grad_()

    labels = torch.randint(0, vocab, (rows,))
    labels[::4] = -100
    return dict(student_hidden=leaf(rows, hs), student_weight=leaf(vocab, hs, scale=0.7),
                teacher_hidden=torch.randn(rows, ht).to(dtype), teacher_weight=(torch.randn(vocab, ht) * 0.7).to(dtype),
                student_bias=leaf(vocab) if bias else None, teacher_bias=torch.randn(vocab).to(dtype) if bias else None,
                labels=labels)


STUDENT = ("student_hidden", "student_weight", "student_bias")


def check_fused(inputs, options, tol=1e-5, grad_ref_dtype=None):
    """backend="triton" against the float64 formula on the same inputs: loss, kd, mlm and grads."""
    import kdfast

    out = kdfast.fused_linear_kd(**inputs, **options, backend="triton")
    leaves = [inputs[name] for name in STUDENT if inputs[name] is not None]
    grads = torch.autograd.grad(out.loss, leaves)

    ref_inputs = {k: (v.detach().double().requires_grad_(k in STUDENT) if torch.is_tensor(v) and v.is_floating_point()
                      else v) for k, v in inputs.items()}
    defaults = dict(ignore_index=-100, temperature=1.0, kd_weight=1.0, mlm_weight=0.0, kind="kl",
                    reduction="batchmean", t2_scale=True, mask=None, row_weights=None, teacher_topk=None)
    args = {**defaults, **options}
    loss, kd, mlm = vocab_kd64(*(ref_inputs[k] for k in ("student_hidden", "student_weight", "teacher_hidden",
                                                          "teacher_weight", "student_bias", "teacher_bias",
                                                          "labels")), *args.values())
    ref_leaves = [ref_inputs[name] for name in STUDENT if ref_inputs[name] is not None]
    ref_grads = torch.autograd.grad(loss, ref_leaves)
    assert rel_err(out.loss, loss) < tol
    assert rel_err(out.kd, kd) < tol or float(kd) == float(out.kd) == 0
    assert rel_err(out.mlm, mlm) < tol or float(mlm) == float(out.mlm) == 0
    for grad, ref in zip(grads, ref_grads):
        assert grad.dtype == leaves[0].dtype
        if grad_ref_dtype is not None:
            ref = ref.to(grad_ref_dtype)
        assert rel_err(grad, ref) < tol


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_linear_kd_grid(small_blocks, temperature, kind, reduction):
    check_fused(head_inputs(), dict(temperature=temperature, kind=kind, reduction=reduction, mlm_weight=0.5))


@pytest.mark.parametrize("options", [
    dict(mlm_weight=0.0, temperature=2.0),                        # KD only, labelled rows
    dict(kd_weight=0.0, mlm_weight=1.0, temperature=2.0),         # MLM only
    dict(t2_scale=False, temperature=4.0, kind="soft_ce", mlm_weight=0.3),
    dict(teacher_topk=5, temperature=2.0, mlm_weight=0.5),
    dict(teacher_topk=1, kind="soft_ce"),
], ids=["kd-only", "mlm-only", "no-t2", "topk", "top1-soft-ce"])
def test_fused_linear_kd_options(small_blocks, options):
    check_fused(head_inputs(), options)


def test_fused_linear_kd_mask_row_weights_no_bias_several_chunks(small_blocks, monkeypatch):
    monkeypatch.setenv("KDFAST_VOCAB_CHUNK_ROWS", "5")
    inputs = head_inputs(rows=17, vocab=257, bias=False)
    mask = torch.rand(17) < 0.6
    check_fused(inputs, dict(mask=mask, row_weights=torch.rand(17) + 0.5, temperature=0.5, mlm_weight=0.5))


def test_fused_linear_kd_extreme_logits(small_blocks):
    inputs = head_inputs()
    with torch.no_grad():
        inputs["student_hidden"].mul_(30)
        inputs["teacher_weight"].mul_(30)
    check_fused(inputs, dict(temperature=0.5, mlm_weight=0.5))


def test_fused_linear_kd_all_rows_ignored_is_zero(small_blocks):
    import kdfast

    inputs = head_inputs()
    inputs["labels"] = torch.full((12,), -100)
    out = kdfast.fused_linear_kd(**inputs, mlm_weight=1.0, backend="triton")
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0
    assert not inputs["student_hidden"].grad.any() and not inputs["student_weight"].grad.any()


@pytest.mark.parametrize("kind", KINDS)
def test_fused_linear_kd_bf16_matches_float64_on_rounded_inputs(small_blocks, kind):
    """No logit is rounded to 16 bits: the loss is within 1e-3 of float64 on the same bf16 values,
    and the bf16 gradients are the float64 ones rounded to bf16."""
    check_fused(head_inputs(dtype=torch.bfloat16), dict(temperature=2.0, kind=kind, mlm_weight=0.5), tol=1e-3,
                grad_ref_dtype=torch.bfloat16)


def kd_kl64(s, t, temperature, mask, kind, reduction, t2_scale):
    keep = torch.ones(len(s), dtype=torch.bool) if mask is None else mask
    kd, _, _, _ = row_terms64(s[keep], t[keep], torch.full((int(keep.sum()),), -1), temperature, kind)
    divisor = {"sum": 1.0, "batchmean": max(len(kd), 1), "mean": max(len(kd) * s.shape[1], 1)}[reduction]
    return kd.sum() * (temperature ** 2 if t2_scale else 1.0) / divisor


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kd_kl_grid(small_blocks, temperature, kind, reduction):
    import kdfast

    s, t = torch.randn(10, 300) * 3, torch.randn(10, 300) * 3
    mask = torch.rand(10) < 0.7 if reduction != "sum" else None
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-3)):
        s_in = s.to(dtype).requires_grad_()
        loss = kdfast.kd_kl(s_in, t.to(dtype), temperature, mask=mask, kind=kind, reduction=reduction,
                            backend="triton")
        (grad,) = torch.autograd.grad(loss, s_in)
        s64 = s.to(dtype).double().requires_grad_()
        ref = kd_kl64(s64, t.to(dtype).double(), temperature, mask, kind, reduction, True)
        (ref_grad,) = torch.autograd.grad(ref, s64)
        assert rel_err(loss, ref) < tol
        assert rel_err(grad, ref_grad.to(dtype)) < tol


def test_triton_declines_float64():
    import kdfast

    s = torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        kdfast.kd_kl(s, s, backend="triton")
