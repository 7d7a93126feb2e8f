"""Reference temperature divergences on logits: forward KL, soft cross-entropy, reverse KL, GKD's JSD."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from kdfast._reduction import kd_divisor, kd_factor, kd_term
from kdfast.reference._common import compute_dtype


def kd_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            kind: str, teacher_topk: Optional[int] = None, beta: float = 0.5) -> torch.Tensor:
    """Per-row KL(p || q), soft CE, KL(q || p) or JSD_beta, [N]; p the (constant) teacher, q the student.
    JSD at beta = 0 and 1 is forward and reverse KL (``kdfast._reduction.kd_term``)."""
    kind = kd_term(kind, beta)
    dtype = compute_dtype(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    b = teacher_logits.detach().to(dtype) / temperature
    if teacher_topk is not None and teacher_topk < b.shape[-1]:
        keep = torch.zeros_like(b, dtype=torch.bool).scatter_(-1, b.topk(teacher_topk, dim=-1).indices, True)
        b = b.masked_fill(~keep, torch.finfo(dtype).min)
    log_p = F.log_softmax(b, dim=-1)
    p = log_p.exp()
    if kind == "kl":
        return (p * (log_p - log_q)).sum(-1)
    if kind == "soft_ce":
        return -(p * log_q).sum(-1)
    q = log_q.exp()
    if kind == "reverse_kl":
        return (q * (log_q - log_p)).sum(-1)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
          mask: Optional[torch.Tensor] = None, kind: str = "kl", reduction: str = "batchmean",
          t2_scale: bool = True, beta: float = 0.5) -> torch.Tensor:
    if mask is not None:
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
    rows = kd_rows(student_logits, teacher_logits, temperature, kind, beta=beta)
    divisor = kd_divisor(reduction, rows.shape[0], student_logits.shape[-1])
    return rows.sum() * (kd_factor(temperature, t2_scale) / divisor)
