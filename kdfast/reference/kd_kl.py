"""Reference temperature divergences on logits: forward KL, soft cross-entropy, reverse KL, GKD's JSD."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from kdfast._reduction import kd_divisor, kd_factor, kd_term
from kdfast.reference._common import compute_dtype


class _StudentDivergence(torch.autograd.Function):
    """Per-row reverse KL or JSD_beta [N] of a = s/T [N, V] (the student) against the teacher's b = t/T.

    Both are w·(D_r + Σ q·δ) (+ JSD's teacher part), and their gradient w.r.t. a is w·q·(δ − Σ q·δ), with D the
    per-element log ratio (log q − log p, or log q − log m), δ = D − D_r relative to the student's argmax r and,
    for JSD, D = −log(1 − β) − softplus(ζ), ζ = log p − log q + log(β/(1 − β)). Written so, a near one-hot
    student keeps its small gradient, where autograd through log_softmax would subtract two nearly equal
    numbers (docs/losses.md, "Numerics")."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
        log_q, log_p = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
        q = log_q.exp()
        r = a.argmax(dim=-1, keepdim=True)
        if kind == "reverse_kl":
            weight, teacher_part = 1.0, 0.0
            delta = (a - a.gather(-1, r)) - (b - b.gather(-1, r))
            d_r = log_q.gather(-1, r) - log_p.gather(-1, r)
        else:
            weight = 1.0 - beta
            zeta = (log_p - log_q) + (math.log(beta) - math.log1p(-beta))
            softplus = F.softplus(zeta)
            delta = softplus.gather(-1, r) - softplus
            d_r = -math.log1p(-beta) - softplus.gather(-1, r)
            p = log_p.exp()  # log p − log m = −log β − softplus(−ζ); 0 where p = 0 (top-k)
            teacher_part = beta * torch.where(p > 0, p * (-math.log(beta) - F.softplus(-zeta)), 0.0).sum(-1)
        k = (q * delta).sum(-1, keepdim=True)
        ctx.save_for_backward(q, delta, k)
        ctx.weight = weight
        return teacher_part + weight * (d_r + k).squeeze(-1)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        q, delta, k = ctx.saved_tensors
        return grad_rows.unsqueeze(-1) * ctx.weight * q * (delta - k), None, None, None


def kd_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            kind: str, teacher_topk: Optional[int] = None, beta: float = 0.5) -> torch.Tensor:
    """Per-row KL(p || q), soft CE, KL(q || p) or JSD_beta, [N]; p the (constant) teacher, q the student.
    JSD at beta = 0 and 1 is forward and reverse KL (``kdfast._reduction.kd_term``)."""
    kind = kd_term(kind, beta)
    dtype = compute_dtype(student_logits, teacher_logits)
    b = teacher_logits.detach().to(dtype) / temperature
    if teacher_topk is not None and teacher_topk < b.shape[-1]:
        keep = torch.zeros_like(b, dtype=torch.bool).scatter_(-1, b.topk(teacher_topk, dim=-1).indices, True)
        b = b.masked_fill(~keep, torch.finfo(dtype).min)
    if kind in ("kl", "soft_ce"):
        log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
        log_p = F.log_softmax(b, dim=-1)
        p = log_p.exp()
    if kind == "kl":
        return (p * (log_p - log_q)).sum(-1)
    if kind == "soft_ce":
        return -(p * log_q).sum(-1)
    return _StudentDivergence.apply(student_logits.to(dtype) / temperature, b, kind, beta)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
          mask: Optional[torch.Tensor] = None, kind: str = "kl", reduction: str = "batchmean",
          t2_scale: bool = True, beta: float = 0.5) -> torch.Tensor:
    if mask is not None:
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
    rows = kd_rows(student_logits, teacher_logits, temperature, kind, beta=beta)
    divisor = kd_divisor(reduction, rows.shape[0], student_logits.shape[-1])
    return rows.sum() * (kd_factor(temperature, t2_scale) / divisor)
