"""Reference vocabulary KD through both LM heads: logits are materialised in fp32 or fp64."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kdfast._reduction import kd_divisor, kd_factor, mlm_divisor
from kdfast.functions.outputs import KDOutput
from kdfast.reference._common import compute_dtype
from kdfast.reference.kd_kl import kd_rows


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype,
            softcap: Optional[float] = None, logit_scale: float = 1.0) -> torch.Tensor:
    """The head's logits as the model reports them: cap·tanh((h·W + b)·scale / cap), or (h·W + b)·scale."""
    logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)) * logit_scale
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def sparse_kd_rows(student_logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, temperature: float,
                   kind: str) -> torch.Tensor:
    """Per-row soft CE -Σ p̂ log q or KL Σ p̂ (log p̂ - log q), [N], against the sparse target
    p̂ = Σ_k weights[:, k]·onehot(ids[:, k]) (ids -1: padding), q = softmax(s / T)."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    valid = ids >= 0
    p_hat = torch.zeros_like(log_q).scatter_add_(1, ids.clamp_min(0), torch.where(valid, weights.to(log_q.dtype), 0))
    rows = -(p_hat * log_q).sum(-1)
    if kind == "kl":
        rows = rows + torch.where(p_hat > 0, p_hat * p_hat.clamp_min(torch.finfo(p_hat.dtype).tiny).log(), 0).sum(-1)
    return rows


def fused_linear_kd(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, student_bias=None,
                    teacher_bias=None, labels=None, ignore_index=-100, temperature=1.0, kd_weight=1.0,
                    mlm_weight=0.0, kind="kl", reduction="batchmean", t2_scale=True, mask=None,
                    row_weights=None, teacher_topk=None, teacher_targets=None, beta=0.5, student_softcap=None,
                    student_logit_scale=1.0, teacher_softcap=None, teacher_logit_scale=1.0) -> KDOutput:
    dtype = compute_dtype(*(t for t in (student_hidden, student_weight, teacher_hidden, teacher_weight)
                            if t is not None))
    kd_rows_mask = mask if mask is not None else (None if labels is None else labels != ignore_index)
    zero = student_hidden.sum().to(dtype) * 0 if student_hidden.numel() else student_hidden.new_zeros((), dtype=dtype)

    kd = zero
    if kd_weight != 0:
        sel = slice(None) if kd_rows_mask is None else kd_rows_mask
        s_logits = _logits(student_hidden[sel], student_weight, student_bias, dtype, student_softcap,
                           student_logit_scale)
        if teacher_targets is not None:
            ids, weights = teacher_targets
            rows = sparse_kd_rows(s_logits, ids[sel], weights[sel].detach(), temperature, kind)
        else:
            with torch.no_grad():
                t_logits = _logits(teacher_hidden[sel], teacher_weight, teacher_bias, dtype, teacher_softcap,
                               teacher_logit_scale)
            rows = kd_rows(s_logits, t_logits, temperature, kind, teacher_topk, beta)
        if row_weights is not None:
            rows = rows * row_weights[sel].to(dtype)
        kd = rows.sum() * (kd_factor(temperature, t2_scale) / kd_divisor(reduction, rows.shape[0],
                                                                          student_weight.shape[0]))
    mlm = zero
    if mlm_weight != 0 and labels is not None:
        kept = labels != ignore_index
        s_logits = _logits(student_hidden[kept], student_weight, student_bias, dtype, student_softcap,
                           student_logit_scale)
        mlm = F.cross_entropy(s_logits, labels[kept], reduction="sum") / mlm_divisor(reduction, int(kept.sum()))
    return KDOutput(kd_weight * kd + mlm_weight * mlm, kd, mlm)


def rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, kd_coef: torch.Tensor, mlm_coef: torch.Tensor,
         temperature: float, kind: str, beta: float = 0.5) -> "tuple[torch.Tensor, torch.Tensor]":
    """Row kernel (contract in kdfast/functions/vocab_kd.py) in float64 torch operations: ``kd_rows`` and the
    cross-entropy, differentiated by autograd. Vocabulary-parallel heads run it per shard on backend 'torch'
    (the unsharded op on that backend materialises the logits instead)."""
    with torch.enable_grad():
        a = s.detach().double().requires_grad_(True)
        b = t.double().masked_fill(t == float("-inf"), torch.finfo(torch.float64).min)  # p = 0 (top-k)
        kd = kd_rows(a, b, temperature, kind, None, beta)
        label_logit = a.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
        mlm = torch.where(labels >= 0, torch.logsumexp(a, 1) - label_logit, 0.0)
        objective = (kd * (kd_coef.double() * temperature) + mlm * mlm_coef.double()).sum()
        (grad,) = torch.autograd.grad(objective, a)
    s.copy_(grad)
    return kd.detach().float(), mlm.detach().float()


rows.vocab_major = True  # torch operations take any strides
