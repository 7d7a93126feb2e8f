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


def _student_parts(kind: str, s: torch.Tensor, t: torch.Tensor, u: torch.Tensor, w: torch.Tensor, total: dict,
                   T: float, beta: float) -> "tuple[torch.Tensor, torch.Tensor]":
    """(ℓ, D_ref) [C] fp64: ℓ = Σ_v q_v (D_v - D_ref) over the shard's columns, D = log q - log p (reverse KL)
    or log q - log m (JSD), relative to D_ref, its value at the student's global argmax (a = 0 there), so
    that ℓ is small where q is near one-hot (as the kernels' reference trick). ``s``, ``t``: logits minus
    the row's max; ``u`` = exp(s / T) (kept); ``w`` scratch."""
    log_za, b_ref = total["a"].log(), total["b_ref"] / total["holds"]  # b = t / T at the student's argmax
    if kind == "reverse_kl":
        d_ref = -log_za - b_ref + total["b"].log()
        delta = torch.sub(s, t, out=w).mul_(1 / T).add_(b_ref.float()[:, None])  # a - b + b_ref
    else:
        log_m_ref = torch.logaddexp(b_ref - total["b"].log() + math.log(beta), -log_za + math.log1p(-beta))
        d_ref = -log_za - log_m_ref
        m = torch.mul(t, 1 / T, out=w).exp_().mul_((beta / total["b"]).float()[:, None])  # beta p (0 off the top-k)
        m.addcmul_(u, ((1 - beta) / total["a"]).float()[:, None]).clamp_min_(torch.finfo(torch.float32).tiny)
        delta = m.log_().neg_().add_(s, alpha=1 / T).add_(log_m_ref.float()[:, None])  # a - log m + log m_ref
    return delta.mul_(u).sum(1).double() / total["a"], d_ref


def _statistics(s: torch.Tensor, t: Optional[torch.Tensor], u: torch.Tensor, labels: torch.Tensor, T: float,
                kind: Optional[str], raw: bool, with_labels: bool, shards) -> "tuple[dict, dict, torch.Tensor]":
    """Shift ``s``, ``t`` [C, V_r] by their rows' global max (all-reduce of [2, C]) and sum their rows'
    statistics over the group (all-reduce of [k, C]): softmax sums ``a`` (s / T), ``b`` (t / T), ``raw``
    (s, when ``raw``), the label's logit, and for reverse KL and JSD the teacher's b at the student's argmax.
    Returns (this rank's, the group's) by name, and the owned label column per row (-1: none). ``u``
    keeps exp(s / T) for reverse KL and JSD, else exp(s) when ``raw``."""
    local = s.shape[1]
    s_top, at = s.max(1)
    top = shards.all_reduce(torch.stack([s_top] + ([] if t is None else [t.amax(1)])), dist.ReduceOp.MAX,
                            "all_reduce(max)")
    s.sub_(top[0, :, None])
    sums = {}
    if t is not None:
        t.sub_(top[1, :, None])  # -inf off the top-k stays -inf
        sums["b"] = _exp_sum(t, 1 / T, u)
    keep_q = kind in ("reverse_kl", "jsd")
    for name in (("raw", "a") if keep_q else ("a", "raw")):
        if name == "a" or raw:
            sums[name] = _exp_sum(s, 1 / T if name == "a" else 1.0, u)
    column = labels - shards.offset
    owned = (labels >= 0) & (column >= 0) & (column < local)
    if with_labels:  # the label's logit (minus the row's max), from the rank that holds it
        sums["label"] = torch.where(owned, s.gather(1, column.clamp(0, local - 1)[:, None]).squeeze(1), 0.0).double()
    if keep_q:  # averaged over the ranks holding a maximum (ties)
        holds = s_top == top[0]
        sums["holds"] = holds.double()
        sums["b_ref"] = torch.where(holds, t.gather(1, at[:, None]).squeeze(1) / T, 0.0).double()
    mine = torch.stack(list(sums.values()))
    total = shards.all_reduce(mine.clone(), dist.ReduceOp.SUM, "all_reduce(sum)")
    return dict(zip(sums, mine)), dict(zip(sums, total)), torch.where(owned, column, -1)


def shard_chunk(kernel: RowKernel, s_ext: torch.Tensor, t_ext: torch.Tensor, u: torch.Tensor,
                w: Optional[torch.Tensor], labels: torch.Tensor, kd_coef: torch.Tensor, mlm_coef: torch.Tensor,
                temperature: float, kind: Optional[str], beta: float, with_labels: bool,
                shards) -> "tuple[torch.Tensor, torch.Tensor]":
    """The row kernel contract on a vocabulary shard: ``s_ext``, ``t_ext`` [C, V_r + 1] fp32 of one layout
    holding the local logits in their first V_r columns (``kind`` None: no KD term, ``t_ext`` scratch);
    ``u`` [C, V_r] and ``w`` (reverse KL, JSD) scratch of that layout. The first V_r columns of ``s_ext``
    become d loss / d s of this shard; returns ``kd_row``, ``mlm_row`` [C] fp64, the same on every rank.
    ``with_labels``: some rows of the call have a label (every chunk of a call passes the same flags, so
    every rank sends statistics of the same heights)."""
    local = s_ext.shape[1] - 1
    s, t = s_ext[:, :local], (t_ext[:, :local] if kind is not None else None)
    T = temperature if kind is not None else 1.0  # no KD term: the cross-entropy's T = 1 serves the kernel
    raw = with_labels and T != 1.0  # the cross-entropy needs softmax(s), apart from softmax(s / T)
    mine, total, owned = _statistics(s, t, u, labels, T, kind, raw, with_labels, shards)
    virtual = [_virtual_logit(total[n], mine[n], T) for n in ("a", "b")[: 1 + (kind is not None)]]
    s_ext[:, local] = virtual[0]
    if kind is not None:
        t_ext[:, local] = virtual[1]
    else:
        t_ext.copy_(s_ext)  # KL(q || q) = 0: only the cross-entropy's gradient remains
    parts = _student_parts(kind, s, t, u, w, total, T, beta) if kind in ("reverse_kl", "jsd") else None
    kernel_labels = torch.where(labels < 0, -1, torch.where(owned >= 0, owned, local))  # elsewhere: virtual
    kd_k, _ = kernel(s_ext, t_ext, kernel_labels, kd_coef, torch.zeros_like(mlm_coef) if raw else mlm_coef, T,
                     kind or "kl", beta)
    kd_row = torch.zeros_like(total["a"])
    if kind is not None:
        kd_row = _combine(s, u, kd_k, virtual, mine, total, parts, kd_coef, T, kind, beta, shards)
    if raw:
        if kind in ("reverse_kl", "jsd"):
            u.pow_(T)  # exp(s / T)^T = exp(s)
        s.addcmul_(u, (mlm_coef / total["raw"]).float()[:, None])
        rows = (owned >= 0).nonzero().squeeze(1)
        s[rows, owned[rows]] -= mlm_coef[rows]
    mlm_row = torch.zeros_like(kd_row)
    if with_labels:
        mlm_row = torch.where(labels >= 0, total["raw" if raw else "a"].log() - total["label"], 0.0)
    return kd_row, mlm_row


def _combine(s: torch.Tensor, u: torch.Tensor, kd_k: torch.Tensor, virtual: "list[torch.Tensor]", mine: dict,
             total: dict, parts: "Optional[tuple[torch.Tensor, torch.Tensor]]", kd_coef: torch.Tensor, T: float,
             kind: str, beta: float, shards) -> torch.Tensor:
    """The row's divergence [C] fp64: the kernel's rows ``kd_k`` less their virtual columns' terms, summed
    over the group (all-reduce of [1 or 2, C]). Reverse KL and JSD: the kernel's gradient q (D - K_r) of
    the shard in ``s`` gets w·kd_coef·q·(K_r - K), ``u`` = exp(s / T), where K_r - K = q_rest (D_rest - D_ref)
    - Σ_{other ranks} ℓ: only small terms where q is near one-hot."""
    log_q, log_p = (logit.double() / T for logit in virtual)  # the virtual column's logits as the kernel saw them
    log_q = log_q - torch.logaddexp(mine["a"].log(), log_q)  # and its masses
    log_p = log_p - torch.logaddexp(mine["b"].log(), log_p)
    rows = [kd_k.double() - virtual_divergence(kind, log_q, log_p, beta)]
    if parts is not None:
        rows.append(parts[0])
    summed = shards.all_reduce(torch.stack(rows), dist.ReduceOp.SUM, "all_reduce(divergence)")
    if parts is None:
        return summed[0]
    own, d_ref = parts
    if kind == "reverse_kl":
        d_rest, weight = log_q - log_p, 1.0
    else:
        d_rest = log_q - torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        weight = 1 - beta
    offset = log_q.exp() * (d_rest - d_ref) - (summed[1] - own)  # K_r - K
    s.addcmul_(u, (weight * kd_coef.double() * offset / total["a"]).float()[:, None])
    return summed[0]
