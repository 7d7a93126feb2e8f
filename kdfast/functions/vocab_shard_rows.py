"""One chunk of vocabulary-parallel fused KD on the backend's row kernel (``kdfast/functions/vocab_parallel.py``).

Rank r holds its shard's logits s, t [C, V_r] of a chunk of rows. Its chunk gets two more, *virtual*,
columns standing for the other ranks' vocabulary, from each row's softmax sums over the whole vocabulary
(all-reduced, [k, C]): the first carries the other ranks' student mass, the second none (a logit ~200 below
the row's log-sum-exp: exp underflows to 0 in fp32), and the two share the other ranks' teacher mass.
On these V_r + 2 columns the softmaxes of s / T and t / T are the global q and p on the shard's columns,
so the unchanged row kernel (contract in ``kdfast/functions/vocab_kd.py``) writes the exact gradient of
the shard for kl and soft CE (q - p; the first column takes all the teacher's mass), and for the labels'
cross-entropy at T = 1 (a label held by another rank points at the first virtual column).

Reverse KL and JSD: the kernel's gradient q (D - K_r) (D = log q - log p, or log q - log m with the factor
1 - beta) uses its own K_r = Σ q D over its columns. The teacher's mass is split between the two virtual
columns so that the first one's D is the q-weighted mean of D over the other ranks' columns (the second
has q = 0): then K_r is the global K and the gradient is exact, as precise as the kernel's on one device
(no difference of large numbers is formed where q is near one-hot). That mean comes from ℓ = Σ q (D - D_ref)
of every shard, relative to D at the student's argmax (one all-reduce of [C] before the kernel).

The kernel's divergence row is the shard's part plus the virtual columns' terms, which are known in closed
form and subtracted; one all-reduce(sum) of [C] gives the row's divergence. With labels at T != 1 the
cross-entropy's softmax of raw s has other rest mass than that of s / T: the kernel gets no MLM term and
softmax(s) - onehot is added here. The logits are shifted by the row's global max first (the kernel is
shift-invariant), so the virtual columns' fp32 values are small and round to ~1e-7 of their masses.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from kdfast.functions.vocab_kd.row_kernels import RowKernel

_NO_MASS = -200.0  # log of a mass relative to the row's sum that is 0 in fp32 (finite, unlike -inf)
_FAR = 1e4  # bound on |E_1 - E_ref| (and -log p1): beyond any logit range, finite in fp32


def _exp_sum(x: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """out = exp(x * scale) (x [C, V_r], out of its strides); returns its row sums [C] fp64."""
    return (torch.exp(x, out=out) if scale == 1 else torch.mul(x, scale, out=out).exp_()).sum(1).double()


def _log_rest(total: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """log of the other ranks' share of a softmax sum [C] fp64 (at least exp(_NO_MASS))."""
    return ((total - mine).clamp_min_(0.0) / total).log().clamp_min_(_NO_MASS)


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
    """(ℓ, E_ref) [C] fp64: ℓ = Σ_v q_v (E_v - E_ref) over the shard's columns, with E = D = log q - log p
    (reverse KL) or E = -softplus(ζ) = D + log(1 - beta), ζ = log p - log q + log(beta / (1 - beta)) (JSD:
    D = log q - log m), relative to E_ref, its value at the student's global argmax (a = 0 there). In these
    forms, those of the kernels, ℓ is small where q is near one-hot, and exactly 0 where p = 0 (top-k)
    and at the argmax. ``s``, ``t``: logits minus the row's max (s = 0 at the student's argmax); ``u`` =
    exp(s / T) (kept); ``w`` scratch."""
    log_za, log_zb = total["a"].log(), total["b"].log()
    b_ref = total["b_ref"] / total["holds"]  # b = t / T at the student's argmax
    if kind == "reverse_kl":
        e_ref = -log_za - b_ref + log_zb
        delta = torch.sub(s, t, out=w).mul_(1 / T).add_(b_ref.float()[:, None])  # a - b + b_ref
    else:
        shift = log_za - log_zb + math.log(beta / (1 - beta))  # ζ = b - a + shift
        e_ref = -torch.nn.functional.softplus(b_ref + shift)
        zeta = torch.sub(t, s, out=w).mul_(1 / T).add_(shift.float()[:, None])
        delta = torch.logaddexp(zeta, zeta.new_zeros(()), out=w).neg_().sub_(e_ref.float()[:, None])
    delta.masked_fill_(s == 0, 0.0)  # exactly, not its rounding, at the argmax: the other ranks' D would carry it
    return delta.mul_(u).sum(1).double() / total["a"], e_ref


def _statistics(s: torch.Tensor, t: Optional[torch.Tensor], u: torch.Tensor, labels: torch.Tensor, T: float,
                kind: Optional[str], raw: bool, with_labels: bool, shards) -> "tuple[dict, dict, torch.Tensor]":
    """Shift ``s``, ``t`` [C, V_r] by their rows' global max (all-reduce of [2, C]) and sum their rows'
    statistics over the group (all-reduce of [k, C]): softmax sums ``a`` (s / T), ``b`` (t / T), ``raw``
    (s, when ``raw``), the label's logit, and for reverse KL and JSD the teacher's b at the student's argmax.
    Returns (this rank's, the group's) by name, and the owned label column per row (-1: none). ``u``
    keeps exp(s / T) for reverse KL and JSD, else exp(s) when ``raw``."""
    local = s.shape[1]
    s_top = s.amax(1)
    top = shards.all_reduce(torch.stack([s_top] + ([] if t is None else [t.amax(1)])), dist.ReduceOp.MAX,
                            "all_reduce(max)")
    s.sub_(top[0, :, None])
    sums = {}
    if t is not None:
        t.sub_(top[1, :, None])  # -inf off the top-k stays -inf
        sums["b"] = _exp_sum(t, 1 / T, u)
    keep_q = kind in ("reverse_kl", "jsd")
    if keep_q:  # b at the student's max (s = 0 there), averaged over the ranks holding one (ties)
        holds = s_top == top[0]
        at_top = torch.mul(s, 1e30, out=u).add_(t).amax(1)  # t at s = 0, -huge elsewhere
        sums["holds"] = holds.double()
        sums["b_ref"] = torch.where(holds, at_top.masked_fill(at_top < -1e29, float("-inf")) / T, 0.0).double()
    for name in (("raw", "a") if keep_q else ("a", "raw")):
        if name == "a" or raw:
            sums[name] = _exp_sum(s, 1 / T if name == "a" else 1.0, u)
    column = labels - shards.offset
    owned = (labels >= 0) & (column >= 0) & (column < local)
    if with_labels:  # the label's logit (minus the row's max), from the rank that holds it
        sums["label"] = torch.where(owned, s.gather(1, column.clamp(0, local - 1)[:, None]).squeeze(1), 0.0).double()
    mine = torch.stack(list(sums.values()))
    total = shards.all_reduce(mine.clone(), dist.ReduceOp.SUM, "all_reduce(sum)")
    return dict(zip(sums, mine)), dict(zip(sums, total)), torch.where(owned, column, -1)


def _split_teacher(kind: str, log_q1: torch.Tensor, log_p_rest: torch.Tensor, e_target: Optional[torch.Tensor],
                   beta: float) -> "list[torch.Tensor]":
    """log of the teacher masses [C] fp64 of the two virtual columns: all of the other ranks' ``log_p_rest``
    on the first (kl, soft CE), or the share that gives the first column (student mass ``log_q1``) E =
    ``e_target`` (``_student_parts``), the rest on the second."""
    if e_target is None:
        return [log_p_rest, torch.full_like(log_p_rest, _NO_MASS)]
    if kind == "reverse_kl":  # E = log q - log p
        log_p1 = log_q1 - e_target
    else:  # E = -softplus(ζ): ζ = log(expm1(-E)) = log p - log q + log(beta / (1 - beta))
        zeta = torch.where(e_target < -30, -e_target, torch.expm1(-e_target).clamp_min(0.0).log())
        log_p1 = zeta + log_q1 - math.log(beta / (1 - beta))
    # Above log_p_rest only where the fp32 sums lost it (a teacher mass below exp(-87) sums to 0): up to e^-60
    log_p1 = torch.minimum(log_p1, log_p_rest.clamp_min(-60.0)).clamp_min_(_NO_MASS if kind == "jsd" else -_FAR)
    log_p2 = log_p_rest + torch.log1p(-(log_p1 - log_p_rest).exp().clamp_max_(1.0))
    return [log_p1, log_p2.clamp_min_(_NO_MASS)]


def _place(ext: torch.Tensor, local: int, log_masses: "list[torch.Tensor]", total: torch.Tensor,
           T: float) -> "list[torch.Tensor]":
    """Write the virtual columns' logits T (log mass + log Σ) into ``ext[:, local:]``; returns them [C] fp32."""
    logits = [(T * (log_mass + total.log())).float() for log_mass in log_masses]
    for i, logit in enumerate(logits):
        ext[:, local + i] = logit
    return logits


def shard_chunk(kernel: RowKernel, s_ext: torch.Tensor, t_ext: torch.Tensor, u: torch.Tensor,
                w: Optional[torch.Tensor], labels: torch.Tensor, kd_coef: torch.Tensor, mlm_coef: torch.Tensor,
                temperature: float, kind: Optional[str], beta: float, with_labels: bool,
                shards) -> "tuple[torch.Tensor, torch.Tensor]":
    """The row kernel contract on a vocabulary shard: ``s_ext``, ``t_ext`` [C, V_r + 2] fp32 of one layout
    holding the local logits in their first V_r columns (``kind`` None: no KD term, ``t_ext`` scratch);
    ``u`` [C, V_r] and ``w`` (reverse KL, JSD) scratch of that layout. The first V_r columns of ``s_ext``
    become d loss / d s of this shard; returns ``kd_row``, ``mlm_row`` [C] fp64, the same on every rank.
    ``with_labels``: some rows of the call have a label (every chunk of a call passes the same flags, so
    every rank sends statistics of the same heights)."""
    local = s_ext.shape[1] - 2
    s, t = s_ext[:, :local], (t_ext[:, :local] if kind is not None else None)
    T = temperature if kind is not None else 1.0  # no KD term: the cross-entropy's T = 1 serves the kernel
    raw = with_labels and T != 1.0  # the cross-entropy needs softmax(s), apart from softmax(s / T)
    mine, total, owned = _statistics(s, t, u, labels, T, kind, raw, with_labels, shards)
    log_q1 = _log_rest(total["a"], mine["a"])
    placed = [_place(s_ext, local, [log_q1, torch.full_like(log_q1, _NO_MASS)], total["a"], T)]
    if kind is not None:
        e_target = None
        if kind in ("reverse_kl", "jsd"):  # the other ranks' q-weighted mean of D
            own, e_ref = _student_parts(kind, s, t, u, w, total, T, beta)
            others = shards.all_reduce(own[None].clone(), dist.ReduceOp.SUM, "all_reduce(reference)")[0] - own
            e_target = e_ref + (others / log_q1.exp()).clamp_(-_FAR, _FAR)  # only rounding is so far (q1 ~ 0)
        log_p = _split_teacher(kind, log_q1, _log_rest(total["b"], mine["b"]), e_target, beta)
        placed.append(_place(t_ext, local, log_p, total["b"], T))
    else:
        t_ext.copy_(s_ext)  # KL(q || q) = 0: only the cross-entropy's gradient remains
    if raw:  # the cross-entropy is added below: no labels, so the kernel skips the raw log-sum-exp
        kernel_labels, kernel_mlm = torch.full_like(labels, -1), torch.zeros_like(mlm_coef)
    else:  # a label held elsewhere points at the first virtual column
        kernel_labels, kernel_mlm = torch.where(labels < 0, -1, torch.where(owned >= 0, owned, local)), mlm_coef
    kd_k, _ = kernel(s_ext, t_ext, kernel_labels, kd_coef, kernel_mlm, T, kind or "kl", beta)
    kd_row = torch.zeros_like(total["a"])
    if kind is not None:
        kd_row = _divergence_rows(kd_k, placed, mine, T, kind, beta, shards)
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


def _divergence_rows(kd_k: torch.Tensor, placed: "list[list[torch.Tensor]]", mine: dict, T: float, kind: str,
                     beta: float, shards) -> torch.Tensor:
    """The row's divergence [C] fp64: the kernel's rows ``kd_k`` less the terms of the virtual columns (their
    logits ``placed``, student and teacher, and masses as the kernel saw them), summed over the group."""
    log_masses = []
    for logits, name in zip(placed, ("a", "b")):
        scaled = [logit.double() / T for logit in logits]
        log_sum = torch.logsumexp(torch.stack([mine[name].log()] + scaled), 0)
        log_masses.append([x - log_sum for x in scaled])
    virtual = sum(virtual_divergence(kind, log_q, log_p, beta) for log_q, log_p in zip(*log_masses))
    return shards.all_reduce((kd_k.double() - virtual)[None], dist.ReduceOp.SUM, "all_reduce(divergence)")[0]
