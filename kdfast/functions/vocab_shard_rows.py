"""One chunk of vocabulary-parallel fused KD on the backend's row kernel (``kdfast/functions/vocab_parallel.py``).

Rank r holds its shard's logits s, t [C, V_r] of a chunk of rows. Its chunk gets one more, *virtual*, column
standing for the other ranks' vocabulary: the student logit T·log Σ_{v off r} exp(s_v / T) and the teacher
logit T·log Σ_{v off r} exp(t_v / T), from each row's softmax sums over the whole vocabulary (all-reduced,
[k, C]). On these V_r + 1 columns the softmaxes of s / T and t / T are the global q and p on the shard's
columns (the virtual one carries the rest of the mass), so the unchanged row kernel (contract in
``kdfast/functions/vocab_kd.py``) writes the exact gradient of the shard for kl and soft CE (q - p), and
for the labels' cross-entropy at T = 1 (a label held by another rank points at the virtual column).
Its divergence row is the shard's part plus the virtual column's, which is known in closed form and
subtracted; one all-reduce(sum) of [C] (JSD: [2, C]) then gives the row's divergence.

Reverse KL and JSD: the kernel's gradient q·(D - K_r) (D = log q - log p, or log q - log m with the factor
1 - beta) uses its own K_r = Σ q·D over its V_r + 1 columns; the global K is the all-reduced sum of the
shards' parts, and the rank-1 term q·(K_r - K) per row makes it exact. Reverse KL's K_r is the kernel's
row; JSD's Σ q (log q - log m) over the shard is one torch pass before the kernel (the kernel returns only
beta·KL(p || m) + (1 - beta)·KL(q || m)). With labels at T != 1 the cross-entropy's softmax of raw s has
other rest mass than that of s / T: the kernel gets no MLM term and softmax(s) - onehot is added here.

The logits are shifted by the row's global max first (the kernel is shift-invariant), so the virtual
column's fp32 value is small and rounds to ~1e-7 of the rest mass at any logit scale.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from kdfast.functions.vocab_kd import RowKernel

_REST_FLOOR = 2.0**-80  # least rest mass relative to the row's sum: a rank holding the whole mass (P = 1, top-k)


def _exp_sum(x: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """out = exp(x * scale) (x [C, V_r], out of its strides); returns its row sums [C] fp64."""
    return torch.mul(x, scale, out=out).exp_().sum(1).double()


def _virtual_logit(total: torch.Tensor, mine: torch.Tensor, temperature: float) -> torch.Tensor:
    """T·log(total - mine) [C] fp32: the logit whose exp(· / T) is the other ranks' mass (floored)."""
    rest = (total - mine).clamp_min_(0.0).maximum(total * _REST_FLOOR)
    return (temperature * rest.log()).float()


def virtual_divergence(kind: str, log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    """The divergence term [C] fp64 of the virtual column (student log-mass ``log_q``, teacher ``log_p``)."""
    q, p = log_q.exp(), log_p.exp()
    if kind == "kl":
        return p * (log_p - log_q)
    if kind == "soft_ce":
        return -p * log_q
    if kind == "reverse_kl":
        return q * (log_q - log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * p * (log_p - log_m) + (1 - beta) * q * (log_q - log_m)


def _jsd_student_part(s: torch.Tensor, t: torch.Tensor, u: torch.Tensor, w: torch.Tensor, z_a: torch.Tensor,
                      z_b: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    """Σ_v q_v (log q_v - log m_v) over the shard's columns [C] fp64; ``u`` = exp(s / T) (kept), ``w``
    scratch; z_a, z_b the global softmax sums of s / T and t / T."""
    m = torch.mul(t, 1 / temperature, out=w).exp_().mul_((beta / z_b).float()[:, None])  # beta p (0 off the top-k)
    m.addcmul_(u, ((1 - beta) / z_a).float()[:, None]).log_()  # log m
    minus_d = m.sub_(s, alpha=1 / temperature).add_(z_a.log().float()[:, None])  # log m - log q
    return -minus_d.mul_(u).nan_to_num_(nan=0.0).sum(1).double() / z_a  # 0 where q = m = 0


def shard_chunk(kernel: RowKernel, s_ext: torch.Tensor, t_ext: torch.Tensor, u: torch.Tensor,
                w: Optional[torch.Tensor], labels: torch.Tensor, kd_coef: torch.Tensor, mlm_coef: torch.Tensor,
                temperature: float, kind: Optional[str], beta: float, with_labels: bool,
                shards) -> "tuple[torch.Tensor, torch.Tensor]":
    """The row kernel contract on a vocabulary shard: ``s_ext``, ``t_ext`` [C, V_r + 1] fp32 of one layout
    holding the local logits in their first V_r columns (``kind`` None: no KD term, ``t_ext`` scratch);
    ``u`` [C, V_r] and ``w`` (JSD only) scratch of that layout. The first V_r columns of ``s_ext`` become
    d loss / d s of this shard; returns ``kd_row``, ``mlm_row`` [C] fp64, the same on every rank.
    ``with_labels``: some rows of the call have a label (every chunk of a call passes the same flags, so
    every rank sends statistics of the same heights)."""
    local = s_ext.shape[1] - 1
    s, t = s_ext[:, :local], t_ext[:, :local]
    with_teacher = kind is not None
    T = temperature if with_teacher else 1.0  # no KD term: the cross-entropy's T = 1 serves the kernel
    raw = with_labels and T != 1.0  # the cross-entropy needs softmax(s), apart from softmax(s / T)
    keep_q = kind in ("reverse_kl", "jsd")  # u keeps exp(s / T), else exp(s) when raw
    top = shards.all_reduce(torch.stack([s.amax(1)] + ([t.amax(1)] if with_teacher else [])), dist.ReduceOp.MAX,
                            "all_reduce(max)")
    s.sub_(top[0, :, None])
    sums = {}
    if with_teacher:
        t.sub_(top[1, :, None])  # -inf off the top-k stays -inf
        sums["b"] = _exp_sum(t, 1 / T, u)
    for name in (("raw", "a") if keep_q else ("a", "raw")):
        if name == "a" or raw:
            sums[name] = _exp_sum(s, 1 / T if name == "a" else 1.0, u)
    column = labels - shards.offset
    owned = (labels >= 0) & (column >= 0) & (column < local)
    if with_labels:  # the label's logit (minus the row's max), from the rank that holds it
        sums["label"] = torch.where(owned, s.gather(1, column.clamp(0, local - 1)[:, None]).squeeze(1), 0.0).double()
    names = list(sums)
    mine = torch.stack([sums[n] for n in names])
    total = dict(zip(names, shards.all_reduce(mine.clone(), dist.ReduceOp.SUM, "all_reduce(sum)")))
    mine = dict(zip(names, mine))
    virtual = [_virtual_logit(total["a"], mine["a"], T)] + ([_virtual_logit(total["b"], mine["b"], T)]
                                                           if with_teacher else [])
    s_ext[:, local] = virtual[0]
    if with_teacher:
        t_ext[:, local] = virtual[1]
    else:
        t_ext.copy_(s_ext)  # KL(q || q) = 0: only the cross-entropy's gradient remains
    part_k = _jsd_student_part(s, t, u, w, total["a"], total["b"], T, beta) if kind == "jsd" else None
    kernel_labels = torch.where(labels < 0, -1, torch.where(owned, column, local))
    kd_k, _ = kernel(s_ext, t_ext, kernel_labels, kd_coef, torch.zeros_like(mlm_coef) if raw else mlm_coef, T,
                     kind or "kl", beta)
    kd_row = torch.zeros_like(total["a"])
    if with_teacher:
        kd_row = _combine(s, u, kd_k, virtual, mine, total, part_k, kd_coef, T, kind, beta, shards)
    if raw:
        if keep_q:
            u.pow_(T)  # exp(s / T)^T = exp(s)
        s.addcmul_(u, (mlm_coef / total["raw"]).float()[:, None])
        rows = owned.nonzero().squeeze(1)
        s[rows, column[rows]] -= mlm_coef[rows]
    mlm_row = torch.zeros_like(kd_row)
    if with_labels:
        mlm_row = torch.where(labels >= 0, total["raw" if raw else "a"].log() - total["label"], 0.0)
    return kd_row, mlm_row


def _combine(s: torch.Tensor, u: torch.Tensor, kd_k: torch.Tensor, virtual: "list[torch.Tensor]", mine: dict,
             total: dict, part_k: Optional[torch.Tensor], kd_coef: torch.Tensor, T: float, kind: str, beta: float,
             shards) -> torch.Tensor:
    """The row's divergence [C] fp64 from the kernel's rows ``kd_k`` of every rank (less their virtual
    columns' terms), and for reverse KL and JSD the rank-1 correction kd_coef·w·q·(K_r - K) of the
    shard's gradient ``s`` (``u`` = exp(s / T), q = u / Σ)."""
    log_q, log_p = (logit.double() / T for logit in virtual)  # the virtual column's logits as the kernel saw them
    log_q = log_q - torch.logaddexp(mine["a"].log(), log_q)  # and its masses
    log_p = log_p - torch.logaddexp(mine["b"].log(), log_p)
    virtual = virtual_divergence(kind, log_q, log_p, beta)
    parts = [kd_k.double() - virtual] + ([] if part_k is None else [part_k])
    parts = shards.all_reduce(torch.stack(parts), dist.ReduceOp.SUM, "all_reduce(divergence)")
    if kind == "reverse_kl":
        offset = kd_k.double() - parts[0]  # K_r - K
    elif kind == "jsd":
        q = log_q.exp()
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        offset = (1 - beta) * (part_k + q * (log_q - log_m) - parts[1])
    else:
        return parts[0]
    s.addcmul_(u, (kd_coef.double() * offset / total["a"]).float()[:, None])
    return parts[0]
