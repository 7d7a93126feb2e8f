"""Strategy losses (kdfast.distilbert/tinybert/minilm/minilm_v2) against independent float64
formulas written here, value and gradients (gradcheck), with masks, odd L and d_s != d_t."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kdfast

B, L, HEADS, D_S, D_T, V = 2, 7, 2, 3, 5, 11
H_S, H_T = HEADS * D_S, HEADS * D_T
M, N = 2, 5  # student / teacher layers (k = 2, odd N)
FORMULATIONS = ("canonical", "paper")


def f64(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=torch.float64).mul(1.5).requires_grad_(requires_grad)


def key_mask():
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, L - 3:] = False
    return mask


# ---- independent float64 formulas ----------------------------------------------------------
def scores(q, k):
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


def score_mse(qs, ks, qt, kt, mask, include_masked):
    diff = scores(qs, ks) - scores(qt, kt).detach()
    if mask is not None and not include_masked:
        diff = diff * mask[:, None, None, :]
    return (diff ** 2).sum() / diff.numel()


def kl_of_scores(s, t, mask):
    """Mean over (B, heads, valid rows) of KL(softmax t || softmax s), masked keys excluded."""
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], -math.inf)
        t = t.masked_fill(~mask[:, None, None, :], -math.inf)
    log_p, log_q = torch.log_softmax(t.detach(), -1), torch.log_softmax(s, -1)
    terms = torch.where(log_p.exp() > 0, log_p.exp() * (log_p - log_q), torch.zeros_like(log_p))
    rows = terms.sum(-1)  # [B, h, L]
    if mask is None:
        return rows.mean()
    return rows[mask[:, None, :].expand_as(rows)].sum() / (mask.sum() * rows.shape[1])


def split(x, heads):
    b, length, width = x.shape
    return x.reshape(b, length, heads, width // heads).permute(0, 2, 1, 3)


def relation(xs, xt, heads, mask):
    xs, xt = split(xs, heads), split(xt, heads)
    return kl_of_scores(scores(xs, xs), scores(xt, xt), mask)


def hidden_mse(hs, ht, proj, mask):
    x = hs if proj is None else hs @ proj.weight.T + proj.bias
    diff = x - ht.detach()
    if mask is not None:
        diff = diff[mask]
    return (diff ** 2).sum() / diff.numel()


# ---- DistilBERT ------------------------------------------------------------------------------
def vocab_inputs(width_t=H_T, requires_grad=True):
    g = dict(requires_grad=requires_grad)
    return dict(student_hidden=f64(B, L, H_S, **g), student_weight=f64(V, H_S, **g), teacher_hidden=f64(B, L, width_t),
                teacher_weight=f64(V, width_t), student_bias=f64(V, **g), teacher_bias=f64(V))


def labels_for(mask):
    labels = torch.full((B, L), -100)
    labels[0, 1], labels[0, 4], labels[1, 2] = 3, 7, 10
    labels[~mask] = -100
    return labels


def distilbert_reference(x, labels, mask, last_s, last_t, formulation):
    s = x["student_hidden"] @ x["student_weight"].T + x["student_bias"]
    t = (x["teacher_hidden"] @ x["teacher_weight"].T + x["teacher_bias"]).detach()
    picked = labels != -100
    mlm = torch.nn.functional.cross_entropy(s[picked], labels[picked])
    if formulation == "paper":
        p = torch.softmax(t[picked], -1)
        soft_ce = -(p * torch.log_softmax(s[picked], -1)).sum() / (picked.sum() * V)
        return soft_ce + mlm
    temp = 2.0
    rows = mask if mask is not None else torch.ones(B, L, dtype=torch.bool)
    log_p, log_q = torch.log_softmax(t[rows] / temp, -1), torch.log_softmax(s[rows] / temp, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum() / rows.sum() * temp ** 2
    cos = torch.nn.functional.cosine_similarity(last_s[rows], last_t[rows].detach(), dim=-1)
    return 5 * kl + 2 * mlm + (1 - cos).mean()


def check_against(fn, reference, inputs):
    """Value to 1e-10 relative, autograd gradients equal the reference's, gradcheck passes."""
    out, ref = fn(*inputs), reference(*inputs)
    assert abs(float((out - ref).detach())) <= 1e-10 * max(abs(float(ref.detach())), 1e-30)
    leaves = [x for x in inputs if x.requires_grad]
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, leaves, allow_unused=True)
    for g, r, x in zip(grads, ref_grads, leaves):
        g = torch.zeros_like(x) if g is None else g
        r = torch.zeros_like(x) if r is None else r
        assert (g - r).norm() <= 1e-10 * max(r.norm().item(), 1e-30) + 1e-14
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("masked", [True, False])
def test_distilbert(formulation, masked):
    mask = key_mask() if masked else None
    labels = labels_for(key_mask())
    x = vocab_inputs(width_t=H_S if formulation == "canonical" else H_T)
    last_s, last_t = f64(B, L, H_S, requires_grad=True), f64(B, L, H_S)
    names = list(x)

    def fn(*tensors):
        kw = dict(zip(names, tensors[:-1]))
        return kdfast.distilbert(**kw, labels=labels, attention_mask=mask, student_last_hidden=tensors[-1],
                                 teacher_last_hidden=last_t, formulation=formulation).loss

    def reference(*tensors):
        kw = dict(zip(names, tensors[:-1]))
        return distilbert_reference(kw, labels, mask, tensors[-1], last_t, formulation)

    check_against(fn, reference, tuple(x.values()) + (last_s,))


# ---- TinyBERT --------------------------------------------------------------------------------
def tinybert_reference(qs, ks, qt, kt, hs, ht, mask, proj, formulation):
    if formulation == "paper":
        return (score_mse(qs[-1], ks[-1], qt[-1], kt[-1], mask, False) + hidden_mse(hs[-1], ht[-1], None, None)
                + score_mse(qs[0], ks[0], qt[0], kt[0], mask, True))
    k = N // M
    att = sum(score_mse(qs[i], ks[i], qt[(i + 1) * k - 1], kt[(i + 1) * k - 1], mask, False) for i in range(M))
    rep = sum(hidden_mse(hs[i], ht[i * k], proj, mask) for i in range(M + 1))
    return att + rep


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("masked", [True, False])
def test_tinybert(formulation, masked):
    mask = key_mask() if masked else None
    width_s = H_S if formulation == "canonical" else H_T
    qs = [f64(B, HEADS, L, D_S, requires_grad=True) for _ in range(M)]
    ks = [f64(B, HEADS, L, D_S, requires_grad=True) for _ in range(M)]
    qt = [f64(B, HEADS, L, D_T) for _ in range(N)]
    kt = [f64(B, HEADS, L, D_T) for _ in range(N)]
    hs = [f64(B, L, width_s, requires_grad=True) for _ in range(M + 1)]
    ht = [f64(B, L, H_T) for _ in range(N + 1)]
    proj = nn.Linear(H_S, H_T).double() if formulation == "canonical" else None
    extra = (proj.weight, proj.bias) if proj is not None else ()

    def unpack(tensors):
        return list(tensors[:M]), list(tensors[M:2 * M]), list(tensors[2 * M:3 * M + 1])

    def fn(*tensors):
        q, k, h = unpack(tensors)
        return kdfast.tinybert(q, k, qt, kt, h, ht, attention_mask=mask, proj=proj, formulation=formulation).loss

    def reference(*tensors):
        q, k, h = unpack(tensors)
        return tinybert_reference(q, k, qt, kt, h, ht, mask, proj, formulation)

    check_against(fn, reference, tuple(qs + ks + hs) + extra)


def test_tinybert_reads_only_the_mapped_layers():
    att, hid = kdfast.losses.methods.tinybert_layer_map(M, N, "canonical")
    assert att == [(0, 1), (1, 3)] and hid == [(0, 0), (1, 2), (2, 4)]
    att, hid = kdfast.losses.methods.tinybert_layer_map(M, N, "paper")
    assert att == [(M - 1, N - 1), (0, 0)] and hid == [(M, N)]


def test_tinybert_missing_layer_message():
    qs = [None, f64(B, HEADS, L, D_S)]
    with pytest.raises(ValueError, match=r"student_q\[0\]: expected a tensor"):
        kdfast.tinybert(qs, qs, [f64(B, HEADS, L, D_T)] * N, [f64(B, HEADS, L, D_T)] * N,
                        [f64(B, L, H_S)] * (M + 1), [f64(B, L, H_T)] * (N + 1), proj=nn.Linear(H_S, H_T).double())


# ---- MiniLM v1 / v2 ---------------------------------------------------------------------------
@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("masked", [True, False])
def test_minilm(formulation, masked):
    mask = key_mask() if masked else None
    student = tuple(f64(B, HEADS, L, D_S, requires_grad=True) for _ in range(3))
    qt, kt, vt = (f64(B, HEADS, L, D_T) for _ in range(3))

    def fn(qs, ks, vs):
        return kdfast.minilm(qs, ks, vs, qt, kt, vt, attention_mask=mask, formulation=formulation).loss

    def reference(qs, ks, vs):
        cat = lambda x: x.permute(0, 2, 1, 3).reshape(B, L, -1)  # noqa: E731
        return kl_of_scores(scores(qs, ks), scores(qt, kt), mask) + relation(cat(vs), cat(vt), HEADS, mask)

    check_against(fn, reference, student)


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("masked", [True, False])
def test_minilm_v2(formulation, masked):
    mask = key_mask() if masked else None
    relation_heads = 3  # paper: the teacher's head count, any common divisor here
    width_s, width_t = 3 * 4, 3 * 5
    student = tuple(f64(B, L, width_s, requires_grad=True) for _ in range(3))
    teacher = tuple(f64(B, L, width_t) for _ in range(3))

    def fn(*xs):
        return kdfast.minilm_v2(*xs, *teacher, relation_heads, attention_mask=mask, formulation=formulation).loss

    def reference(*xs):
        used = mask if formulation == "canonical" else None
        return sum(relation(s, t, relation_heads, used) for s, t in zip(xs, teacher))

    check_against(fn, reference, student)


def test_minilm_v2_defaults():
    defaults = kdfast.losses.methods.minilm_v2_defaults
    assert defaults(12, 768, 12, "canonical") == (11, 48)
    assert defaults(24, 1024, 16, "canonical") == (20, 64)
    assert defaults(24, 1024, 16, "paper") == (23, 16)


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_formulation_message():
    with pytest.raises(ValueError, match="formulation: expected one of 'canonical', 'paper', got 'nope'"):
        kdfast.minilm_v2(*(f64(B, L, 4) for _ in range(6)), 2, formulation="nope")


def test_distilbert_cosine_needs_equal_widths():
    x = vocab_inputs()
    with pytest.raises(ValueError, match="cosine term needs equal widths; use formulation='paper'"):
        kdfast.distilbert(**x, labels=labels_for(key_mask()), student_last_hidden=f64(B, L, H_S),
                          teacher_last_hidden=f64(B, L, H_T))


def test_relation_heads_must_divide_widths():
    with pytest.raises(ValueError, match="divisible by num_relation_heads=4"):
        kdfast.minilm_v2(*(f64(B, L, 6) for _ in range(6)), 4)
