"""The torch reference backend against independent float64 formulas (value and gradients to 1e-10),
plus gradcheck. The formulas here are written from the definitions, not from kdfast.reference."""
from __future__ import annotations

import math

import pytest
import torch

import kdfast

TOL = 1e-10
f64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def grads_of(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    value = fn(*inputs)
    return value.detach(), torch.autograd.grad(value, inputs)


def assert_matches(kdfast_fn, formula, *inputs):
    value, grads = grads_of(kdfast_fn, *inputs)
    ref_value, ref_grads = grads_of(formula, *inputs)
    assert rel(value, ref_value) < TOL, (value, ref_value)
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) < TOL


# ---- independent formulas -------------------------------------------------------------------------------

def row_kl(s_row, t_row, temp, kind):
    """KL(p||q) or -sum p log q for one row, from exp/sum directly."""
    a, b = s_row / temp, t_row / temp
    lse_a = a.max() + torch.log(torch.exp(a - a.max()).sum())
    lse_b = b.max() + torch.log(torch.exp(b - b.max()).sum())
    p = torch.exp(b - lse_b)
    if kind == "kl":
        return (p * ((b - lse_b) - (a - lse_a))).sum()
    return -(p * (a - lse_a)).sum()


def kd_formula(s, t, temp, kind, reduction, t2, keep=None, weights=None):
    rows = range(s.shape[0]) if keep is None else [i for i in range(s.shape[0]) if keep[i]]
    terms = [row_kl(s[i], t[i].detach(), temp, kind) * (1.0 if weights is None else weights[i]) for i in rows]
    total = torch.stack(terms).sum() if terms else s.sum() * 0
    n = len(terms)
    divisor = {"sum": 1.0, "batchmean": max(n, 1), "mean": max(n * s.shape[1], 1)}[reduction]
    return total * (temp ** 2 if t2 else 1.0) / divisor


def attention_rows_formula(qs, ks, qt, kt, key_mask):
    """Loop over (b, h, i): KL of the softmax rows restricted to valid keys."""
    b_, h_, length, ds = qs.shape
    dt = qt.shape[-1]
    terms = []
    for b in range(b_):
        valid = [j for j in range(length) if key_mask is None or key_mask[b, j]]
        for h in range(h_):
            for i in valid:
                s = torch.stack([qs[b, h, i] @ ks[b, h, j] for j in valid]) / math.sqrt(ds)
                t = torch.stack([qt[b, h, i] @ kt[b, h, j] for j in valid]).detach() / math.sqrt(dt)
                terms.append(row_kl(s, t, 1.0, "kl"))
    return torch.stack(terms).sum() / len(terms)


def score_mse_formula(qs, ks, qt, kt, key_mask, include_masked):
    s = torch.einsum("bhid,bhjd->bhij", qs, ks) / math.sqrt(qs.shape[-1])
    t = torch.einsum("bhid,bhjd->bhij", qt, kt).detach() / math.sqrt(qt.shape[-1])
    sq = (s - t) ** 2
    if key_mask is not None and not include_masked:
        sq = torch.where(key_mask[:, None, None, :], sq, torch.zeros_like(sq))
    return sq.sum() / sq.numel()


def make_mask(b, length):
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[-1, length // 2 + 1:] = False
    return mask


# ---- kd_kl ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("temp,t2", [(1.0, True), (2.0, True), (0.5, False)])
def test_kd_kl_matches_formula(kind, reduction, temp, t2):
    s, t = torch.randn(5, 7, dtype=f64) * 3, torch.randn(5, 7, dtype=f64) * 3
    keep = torch.tensor([True, False, True, True, False])
    assert_matches(lambda s: kdfast.kd_kl(s, t, temp, keep, kind, reduction, t2, backend="torch"),
                   lambda s: kd_formula(s, t, temp, kind, reduction, t2, keep), s)


def test_kd_kl_gradcheck_and_extreme_logits():
    t = torch.randn(4, 9, dtype=f64) * 40
    s = (torch.randn(4, 9, dtype=f64) * 40).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: kdfast.kd_kl(s, t, 2.0, backend="torch"), (s,))
    assert_matches(lambda s: kdfast.kd_kl(s, t, 1.0, backend="torch"), lambda s: kd_formula(s, t, 1.0, "kl",
                                                                                            "batchmean", True), s)


def test_kd_kl_no_kept_rows_is_zero_with_zero_grads():
    s = torch.randn(3, 5, dtype=f64, requires_grad=True)
    loss = kdfast.kd_kl(s, torch.randn(3, 5, dtype=f64), mask=torch.zeros(3, dtype=torch.bool), backend="torch")
    loss.backward()
    assert loss.item() == 0 and not torch.isnan(s.grad).any() and s.grad.abs().sum() == 0


# ---- fused_linear_kd --------------------------------------------------------------------------------------

def fused_formula(hs, ws, bs, ht, wt, bt, labels, temp, kd_w, mlm_w, kind, reduction, t2, mask=None,
                  weights=None, topk=None):
    s = hs @ ws.T + bs
    t = (ht @ wt.T + bt).detach()
    if topk is not None:
        kth = t.topk(topk, dim=1).values[:, -1:]
        t = torch.where(t >= kth, t, torch.full_like(t, -1e300))
    keep = mask if mask is not None else labels != -100
    kd = kd_formula(s, t, temp, kind, reduction, t2, keep, weights)
    lab = [i for i in range(s.shape[0]) if labels[i] != -100]
    ce = torch.stack([torch.logsumexp(s[i], 0) - s[i, labels[i]] for i in lab]).sum()
    mlm = ce / (1.0 if reduction == "sum" else max(len(lab), 1))
    return kd_w * kd + mlm_w * mlm


@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0, 4.0])
def test_fused_linear_kd_matches_formula(kind, reduction, temp):
    n, v, h_s, h_t = 6, 11, 5, 7
    hs, ws, bs = torch.randn(n, h_s, dtype=f64), torch.randn(v, h_s, dtype=f64), torch.randn(v, dtype=f64)
    ht, wt, bt = torch.randn(n, h_t, dtype=f64), torch.randn(v, h_t, dtype=f64), torch.randn(v, dtype=f64)
    labels = torch.tensor([3, -100, 0, 10, -100, 7])

    def ours(hs, ws, bs):
        return kdfast.fused_linear_kd(hs, ws, ht, wt, bs, bt, labels=labels, temperature=temp, kd_weight=0.7,
                                      mlm_weight=0.3, kind=kind, reduction=reduction, backend="torch").loss

    assert_matches(ours, lambda hs, ws, bs: fused_formula(hs, ws, bs, ht, wt, bt, labels, temp, 0.7, 0.3, kind,
                                                          reduction, True), hs, ws, bs)


def test_fused_linear_kd_mask_weights_topk_and_gradcheck():
    n, v = 5, 9
    hs, ws, bs = torch.randn(n, 4, dtype=f64), torch.randn(v, 4, dtype=f64), torch.randn(v, dtype=f64)
    ht, wt, bt = torch.randn(n, 6, dtype=f64), torch.randn(v, 6, dtype=f64), torch.randn(v, dtype=f64)
    labels = torch.tensor([1, -100, 2, -100, 8])
    mask = torch.tensor([True, True, False, True, True])
    weights = torch.rand(n, dtype=f64)

    def ours(hs, ws, bs):
        return kdfast.fused_linear_kd(hs, ws, ht, wt, bs, bt, labels=labels, temperature=2.0, mlm_weight=1.0,
                                      mask=mask, row_weights=weights, teacher_topk=3, backend="torch").loss

    assert_matches(ours, lambda hs, ws, bs: fused_formula(hs, ws, bs, ht, wt, bt, labels, 2.0, 1.0, 1.0, "kl",
                                                          "batchmean", True, mask, weights, topk=3), hs, ws, bs)
    inputs = tuple(x.clone().requires_grad_(True) for x in (hs, ws, bs))
    assert torch.autograd.gradcheck(ours, inputs)


def test_fused_linear_kd_all_rows_ignored():
    hs = torch.randn(3, 4, dtype=f64, requires_grad=True)
    out = kdfast.fused_linear_kd(hs, torch.randn(6, 4, dtype=f64), torch.randn(3, 5, dtype=f64),
                                 torch.randn(6, 5, dtype=f64), labels=torch.full((3,), -100), mlm_weight=1.0,
                                 backend="torch")
    out.loss.backward()
    assert out.loss.item() == 0 and out.kd.item() == 0 and out.mlm.item() == 0
    assert hs.grad is not None and hs.grad.abs().sum() == 0


# ---- attention losses -------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [1, 5])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_kl_matches_formula(length, masked):
    b, h, ds, dt = 2, 2, 3, 5
    qs, ks = torch.randn(b, h, length, ds, dtype=f64), torch.randn(b, h, length, ds, dtype=f64)
    qt, kt = torch.randn(b, h, length, dt, dtype=f64), torch.randn(b, h, length, dt, dtype=f64)
    mask = make_mask(b, length) if masked else None
    assert_matches(lambda qs, ks: kdfast.attention_kl(qs, ks, qt, kt, mask, backend="torch"),
                   lambda qs, ks: attention_rows_formula(qs, ks, qt, kt, mask), qs, ks)
    inputs = (qs.clone().requires_grad_(True), ks.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda qs, ks: kdfast.attention_kl(qs, ks, qt, kt, mask, backend="torch"),
                                    inputs)


@pytest.mark.parametrize("masked", [False, True])
def test_relation_kl_matches_formula(masked):
    b, length, width_s, width_t, heads = 2, 5, 6, 9, 3
    xs, xt = torch.randn(b, length, width_s, dtype=f64), torch.randn(b, length, width_t, dtype=f64)
    mask = make_mask(b, length) if masked else None

    def formula(xs):
        split_s = torch.stack(xs.split(width_s // heads, dim=-1), dim=1)
        split_t = torch.stack(xt.split(width_t // heads, dim=-1), dim=1)
        return attention_rows_formula(split_s, split_s, split_t, split_t, mask)

    assert_matches(lambda xs: kdfast.relation_kl(xs, xt, heads, mask, backend="torch"), formula, xs)
    assert torch.autograd.gradcheck(lambda xs: kdfast.relation_kl(xs, xt, heads, mask, backend="torch"),
                                    (xs.clone().requires_grad_(True),))


@pytest.mark.parametrize("masked,include", [(False, False), (True, False), (True, True)])
def test_attention_score_mse_matches_formula(masked, include):
    b, h, length, ds, dt = 2, 2, 7, 3, 4
    qs, ks = torch.randn(b, h, length, ds, dtype=f64), torch.randn(b, h, length, ds, dtype=f64)
    qt, kt = torch.randn(b, h, length, dt, dtype=f64), torch.randn(b, h, length, dt, dtype=f64)
    mask = make_mask(b, length) if masked else None
    assert_matches(lambda qs, ks: kdfast.attention_score_mse(qs, ks, qt, kt, mask, include, backend="torch"),
                   lambda qs, ks: score_mse_formula(qs, ks, qt, kt, mask, include), qs, ks)
    inputs = (qs.clone().requires_grad_(True), ks.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(
        lambda qs, ks: kdfast.attention_score_mse(qs, ks, qt, kt, mask, include, backend="torch"), inputs)


@pytest.mark.parametrize("masked", [False, True])
def test_hidden_mse_matches_formula(masked):
    b, length, width_s, width_t = 2, 5, 3, 4
    hs, ht = torch.randn(b, length, width_s, dtype=f64), torch.randn(b, length, width_t, dtype=f64)
    proj = torch.nn.Linear(width_s, width_t).double()
    w, bias = proj.weight.detach().clone(), proj.bias.detach().clone()
    mask = make_mask(b, length) if masked else None

    def ours(hs, w, bias):
        with torch.no_grad():
            proj.weight.copy_(w)
            proj.bias.copy_(bias)
        proj.weight.grad = proj.bias.grad = None
        return kdfast.hidden_mse(hs, ht, proj, mask, backend="torch")

    def formula(hs, w, bias):
        keep = torch.ones(b, length, dtype=torch.bool) if mask is None else mask
        diffs = [(hs[i, j] @ w.T + bias - ht[i, j]) for i in range(b) for j in range(length) if keep[i, j]]
        return torch.stack(diffs).pow(2).sum() / (len(diffs) * width_t)

    value = ours(hs, w, bias)
    hs_req = hs.clone().requires_grad_(True)
    loss = ours(hs_req, w, bias)
    loss.backward()
    ref_value, (g_hs, g_w, g_b) = grads_of(formula, hs, w, bias)
    assert rel(value, ref_value) < TOL
    assert rel(hs_req.grad, g_hs) < TOL and rel(proj.weight.grad, g_w) < TOL and rel(proj.bias.grad, g_b) < TOL
    assert torch.autograd.gradcheck(lambda x: kdfast.hidden_mse(x, ht, proj, mask, backend="torch"),
                                    (hs.clone().requires_grad_(True),))
