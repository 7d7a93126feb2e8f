"""Independent float64 formulas for the vocabulary-KD tests (not kdfast.reference): explicit
log-softmaxes, KL / soft CE / reverse KL / JSD (mixture m = beta p + (1 - beta) q formed explicitly; forward
and reverse KL at beta = 0 and 1, TRL's and Liger's endpoints), MLM CE, reductions, top-k teacher, row
weights, softcapped / rescaled heads."""
from __future__ import annotations

import torch


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    m = x.max(dim=1, keepdim=True).values
    return x - m - (x - m).exp().sum(dim=1, keepdim=True).log()


def _plogx(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p * log(x) with 0 where p = 0 (also for x = 0), NaN-free under autograd."""
    live = p > 0
    return torch.where(live, p * torch.where(live, x, torch.ones_like(x)).log(), torch.zeros_like(p))


def kd_rows(s: torch.Tensor, t: torch.Tensor, temperature: float, kind: str, topk=None, beta=0.5) -> torch.Tensor:
    """Per-row KL(p || q), -sum p log q, KL(q || p) or beta KL(p || m) + (1 - beta) KL(q || m) with
    m = beta p + (1 - beta) q (KL(p || q) at beta = 0, KL(q || p) at beta = 1), float64,
    p = softmax(t/T) (top-k renormalised), q = softmax(s/T)."""
    log_q = _log_softmax(s / temperature)
    b = t / temperature
    if topk is not None and topk < b.shape[1]:
        kth = b.sort(dim=1, descending=True).values[:, topk - 1:topk]
        b = torch.where(b >= kth, b, torch.tensor(float("-inf"), dtype=b.dtype))
    log_p = _log_softmax(b)
    p = log_p.exp()
    if kind == "kl":
        return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(1)
    if kind == "soft_ce":
        return -(p * log_q).sum(1)
    q = log_q.exp()
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return (q * (log_q - log_p)).sum(1)
    if kind == "jsd" and beta == 0:
        return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(1)
    m = beta * p + (1 - beta) * q
    kl_pm = (_plogx(p, p) - _plogx(p, m)).sum(1)
    kl_qm = (_plogx(q, q) - _plogx(q, m)).sum(1)
    return beta * kl_pm + (1 - beta) * kl_qm


def head_logits(hidden, weight, bias=None, softcap=None, logit_scale=1.0) -> torch.Tensor:
    """u = hidden @ weight^T + bias, then z = softcap * tanh(u * logit_scale / softcap) (or u * logit_scale)."""
    u = (hidden @ weight.t() + (0 if bias is None else bias)) * logit_scale
    return u if softcap is None else torch.tanh(u / softcap) * softcap


def loss(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=None, teacher_bias=None,
         labels=None, ignore_index=-100, temperature=1.0, kd_weight=1.0, mlm_weight=0.0, kind="kl",
         reduction="batchmean", t2_scale=True, mask=None, row_weights=None, teacher_topk=None,
         beta=0.5, student_softcap=None, student_logit_scale=1.0, teacher_softcap=None,
         teacher_logit_scale=1.0) -> torch.Tensor:
    """The fused_linear_kd loss in float64 (differentiable w.r.t. the float64 student tensors)."""
    s = head_logits(student_hidden, student_weight, student_bias, student_softcap, student_logit_scale)
    t = head_logits(teacher_hidden, teacher_weight, teacher_bias, teacher_softcap, teacher_logit_scale)
    n, vocab = s.shape
    labelled = torch.ones(n, dtype=torch.bool) if labels is None else labels != ignore_index
    kd_sel = mask if mask is not None else labelled
    total = s.sum() * 0
    if kd_weight:
        rows = kd_rows(s[kd_sel], t[kd_sel], temperature, kind, teacher_topk, beta)
        if row_weights is not None:
            rows = rows * row_weights[kd_sel]
        count = int(kd_sel.sum())
        divisor = {"sum": 1, "batchmean": max(count, 1), "mean": max(count * vocab, 1)}[reduction]
        total = total + kd_weight * rows.sum() * (temperature**2 if t2_scale else 1.0) / divisor
    if mlm_weight and labels is not None:
        log_sm = _log_softmax(s[labelled])
        ce = -log_sm.gather(1, labels[labelled][:, None]).sum()
        total = total + mlm_weight * ce / (1 if reduction == "sum" else max(int(labelled.sum()), 1))
    return total


def loss_and_grads(**kwargs) -> tuple:
    """(loss, d student_hidden, d student_weight[, d student_bias]) in float64 from possibly lower-precision
    inputs (which are upcast exactly)."""
    names = ["student_hidden", "student_weight"] + (["student_bias"] if kwargs.get("student_bias") is not None else [])
    args = {k: (v.detach().double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
    for name in names:
        args[name].requires_grad_(True)
    value = loss(**args)
    grads = torch.autograd.grad(value, [args[name] for name in names], allow_unused=True)
    return (value.detach(), *[torch.zeros_like(args[n]) if g is None else g for n, g in zip(names, grads)])


def kd_kl(student_logits, teacher_logits, temperature=1.0, mask=None, kind="kl", reduction="batchmean",
          t2_scale=True, beta=0.5) -> torch.Tensor:
    s, t = student_logits, teacher_logits
    if mask is not None:
        s, t = s[mask], t[mask]
    rows = kd_rows(s, t, temperature, kind, beta=beta)
    count, vocab = s.shape
    divisor = {"sum": 1, "batchmean": max(count, 1), "mean": max(count * vocab, 1)}[reduction]
    return rows.sum() * (temperature**2 if t2_scale else 1.0) / divisor


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)
