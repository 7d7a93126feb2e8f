"""Triton row kernel for vocabulary KD: loss per row and d loss / d student logits, in place.

One program per row walks the vocabulary in ``BLOCK_V`` chunks twice, ``_stats_pass`` then ``_grad_pass`` (see
``../shared/DESIGN.md``, "Vocabulary KD: one row"), with a = s/T and b = t/T:

1. one online pass keeps running (max, sum) of exp(a) and exp(b) (and of exp(s) for the MLM
   log-sum-exp when T != 1), plus acc = sum exp(b - m_b)·(b - a) (KL) or sum exp(b - m_b)·(-a)
   (soft CE), all rescaled whenever a running max moves;
2. a second pass writes ``kd_coef·(q - p) + mlm_coef·(softmax(s) - onehot(y))`` over ``s``.

Reverse KL and JSD (``KIND`` 2, 3; the math of ``csrc/vocab_kd_math.h``). Reverse KL: pass 1 also keeps
k = sum q·delta online (deltas relative to the running argmax, moved when the max moves), so its second pass
writes ``kd_coef·q·(delta - k) + mlm_coef·(softmax(s) - onehot(y))``. JSD: pass 1 also keeps b_ref, the
teacher's b at the student's argmax; pass 2 (``_jsd_pass``) writes the gradient without its k term into ``s`` and
``kd_coef·w·q`` into ``t`` (scratch) while summing q·delta and the p terms; pass 3 subtracts k·t.
The launcher is the ``torch.library.triton_op`` ``kdfast::vocab_kd_rows_triton`` (``wrap_triton``).

Teacher entries equal to -inf have p = 0 (top-k targets). All math is fp32: loads are cast to fp32
(the interpreter also needs this for bf16 reductions). :func:`rows` is this backend's row kernel
for the chunked driver (``kdfast/functions/vocab_kd.py``); it takes fp32 contiguous [C, V] logits.
No autotuning: the block size follows V, so importing never touches a GPU driver.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kdfast._buffers import new_output
from kdfast._reduction import KINDS
from kdfast.functions.vocab_kd import fake_rows
from kdfast.ops._library import triton_op, wrap_triton
from kdfast.triton.static import KernelSpec


@triton.jit
def _online_update(m, total, x):
    """Fold a chunk ``x`` into a running (max m, total = sum exp(x - m)); returns (m_new, total_new,
    rescale, exp(x - m_new)). -inf entries contribute 0, and an all -inf prefix stays (-inf, 0), no NaN."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe)
    return m_new, total * rescale + tl.sum(e, axis=0), rescale, e


@triton.jit
def _load_block(s_row, t_row, start, V, BLOCK_V: tl.constexpr):
    """Columns ``start + [0, BLOCK_V)`` of one row: (cols, in_row, s, t) in fp32; past V, s = 0 and t = -inf."""
    cols = start + tl.arange(0, BLOCK_V)
    in_row = cols < V
    s = tl.load(s_row + cols, mask=in_row, other=0.0).to(tl.float32)
    t = tl.load(t_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
    return cols, in_row, s, t


@triton.jit
def _log1p_ratio(lo, hi):
    """log(1 + lo/hi) for 0 <= lo <= hi (0 where hi = 0): 2 atanh(w), w = lo/(2 hi + lo), a series in w^2 <= 1/9
    (``vocab_log1p_ratio`` of csrc/vocab_kd_math.h)."""
    w = lo / tl.where(hi > 0.0, 2.0 * hi + lo, 1.0)
    z = w * w
    y = 1.0 / 13.0
    y = y * z + 1.0 / 11.0
    y = y * z + 1.0 / 9.0
    y = y * z + 1.0 / 7.0
    y = y * z + 1.0 / 5.0
    y = y * z + 1.0 / 3.0
    y = y * z + 1.0
    return 2.0 * w * y


@triton.jit
def _jsd_softplus(a, b, q, p, beta, zeta0):
    """(softplus(zeta), softplus(-zeta)), zeta = log p - log q + log(beta / (1 - beta)) = (b - a) + zeta0 with
    a, b the row-max-relative a = s/T, b = t/T; exp(-|zeta|) is the ratio of the smaller to the larger of beta·p
    and (1 - beta)·q (``jsd_softplus`` of csrc/vocab_kd_math.h)."""
    zeta = (b - a) + zeta0
    bp = beta * p
    bq = (1.0 - beta) * q
    log1p = _log1p_ratio(tl.minimum(bp, bq), tl.maximum(bp, bq))
    return tl.maximum(zeta, 0.0) + log1p, tl.maximum(-zeta, 0.0) + log1p


@triton.jit
def _softmax_s(s, q, lse_s, RAW_LSE: tl.constexpr):
    """softmax(s) of the MLM term: q at T = 1, else its own exp."""
    if RAW_LSE:
        return tl.exp(s - lse_s)
    return q


@triton.jit
def _stats_pass(s_row, t_row, V, inv_temperature, KIND: tl.constexpr, RAW_LSE: tl.constexpr,
                BLOCK_V: tl.constexpr):
    """Pass 1 over a row: online (max, sum) of exp(a), exp(b) (and of exp(s) when RAW_LSE), with a = s/T,
    b = t/T; KL / soft CE: the rescaled accumulator acc; reverse KL: k = sum exp(a - m_a)·delta online;
    reverse KL and JSD: b_ref, b at the student's argmax. Returns (m_a, l_a, m_b, l_b, acc, m_s, l_s, b_ref, k)."""
    m_a = float("-inf")
    l_a = 0.0
    m_b = float("-inf")
    l_b = 0.0
    acc = 0.0
    m_s = float("-inf")
    l_s = 0.0
    b_ref = 0.0
    k = 0.0
    for start in range(0, V, BLOCK_V):
        _, in_row, s, t = _load_block(s_row, t_row, start, V, BLOCK_V)
        a = s * inv_temperature
        b = t * inv_temperature
        a_in = tl.where(in_row, a, float("-inf"))
        if KIND >= 2:  # b at the block's student argmax
            block_max = tl.max(a_in, axis=0)
            b_at = tl.max(tl.where(a_in == block_max, b, float("-inf")), axis=0)
        if KIND == 2:  # the block's sums relative to (block_max, b_at), merged into the row's
            e = tl.exp(a_in - block_max)
            sum_blk = tl.sum(e, axis=0)
            acc_blk = tl.sum(tl.where(in_row, e * ((a_in - block_max) - (b - b_at)), 0.0), axis=0)
            up = block_max > m_a
            lo_m = tl.where(up, m_a, block_max)
            hi_m = tl.where(up, block_max, m_a)
            lo_sum = tl.where(up, l_a, sum_blk)
            lo_acc = tl.where(up, k, acc_blk)
            shift = (lo_m - hi_m) - (tl.where(up, b_ref, b_at) - tl.where(up, b_at, b_ref))
            f = tl.exp(lo_m - hi_m)
            moved = tl.where(lo_sum > 0.0, (lo_acc + lo_sum * shift) * f, 0.0)
            k = tl.where(up, acc_blk, k) + moved
            l_a = tl.where(up, sum_blk, l_a) + lo_sum * f
            b_ref = tl.where(up, b_at, b_ref)
            m_a = hi_m
        else:
            if KIND == 3:
                b_ref = tl.where(block_max > m_a, b_at, b_ref)
            m_a, l_a, _, _ = _online_update(m_a, l_a, a_in)
        m_b, l_b, rescale_b, e_b = _online_update(m_b, l_b, b)
        if KIND < 2:
            if KIND == 1:
                gap = -a
            else:
                gap = b - a
            # p = 0 entries (top-k, past V) contribute 0, not 0·inf.
            acc = acc * rescale_b + tl.sum(e_b * tl.where(e_b > 0.0, gap, 0.0), axis=0)
        if RAW_LSE:
            m_s, l_s, _, _ = _online_update(m_s, l_s, tl.where(in_row, s, float("-inf")))
    return m_a, l_a, m_b, l_b, acc, m_s, l_s, b_ref, k


@triton.jit
def _jsd_pass(s_row, t_row, V, label, inv_temperature, m_a, l_a, m_b, l_b, b_ref, lse_s, kd_coef, mlm_coef,
              beta, log_beta, log_1m_beta, RAW_LSE: tl.constexpr, BLOCK_V: tl.constexpr):
    """JSD pass 2: the gradient without its k term into s, kd_coef·(1 - beta)·q into t (scratch).
    Returns (k = sum q·delta, the row's JSD)."""
    zeta0 = (tl.log(l_a) - tl.log(l_b)) + (log_beta - log_1m_beta)
    inv_l_a = 1.0 / l_a
    inv_l_b = 1.0 / l_b
    # The argmax's softplus as this pass computes it there (a = 0, q = inv_l_a), so its delta is exactly 0.
    b_r = b_ref - m_b
    sp_ref, _ = _jsd_softplus(0.0, b_r, inv_l_a, tl.exp(b_r) * inv_l_b, beta, zeta0)
    q_scale = kd_coef * (1.0 - beta)
    sum_q_delta = 0.0
    sum_p = 0.0
    for start in range(0, V, BLOCK_V):
        cols, in_row, s, t = _load_block(s_row, t_row, start, V, BLOCK_V)
        a = tl.where(in_row, s * inv_temperature - m_a, float("-inf"))
        b = t * inv_temperature - m_b
        q = tl.exp(a) * inv_l_a
        p = tl.exp(b) * inv_l_b
        sp_pos, sp_neg = _jsd_softplus(a, b, q, p, beta, zeta0)
        delta = tl.where(in_row, sp_ref - sp_pos, 0.0)
        sum_q_delta += tl.sum(q * delta, axis=0)
        sum_p += tl.sum(tl.where(p > 0.0, p * (-log_beta - sp_neg), 0.0), axis=0)
        q_coef = q_scale * q
        softmax_s = _softmax_s(s, q, lse_s, RAW_LSE)
        grad = q_coef * delta + mlm_coef * (softmax_s - tl.where(cols == label, 1.0, 0.0))
        tl.store(s_row + cols, grad, mask=in_row)
        tl.store(t_row + cols, q_coef, mask=in_row)
    return sum_q_delta, beta * sum_p + (1.0 - beta) * ((-log_1m_beta - sp_ref) + sum_q_delta)


@triton.jit
def _grad_pass(s_row, t_row, V, label, inv_temperature, m_a, l_a, lse_a, lse_b, b_ref, lse_s, k, kd_coef,
               mlm_coef, KIND: tl.constexpr, RAW_LSE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Last pass: d loss / d s = kd_coef·d kd_row / d a + mlm_coef·(softmax(s) - onehot(label)), over s
    (JSD: s -= k·t, the rest written by _jsd_pass)."""
    log_l_a = tl.log(l_a)
    for start in range(0, V, BLOCK_V):
        cols, in_row, s, t = _load_block(s_row, t_row, start, V, BLOCK_V)
        if KIND == 3:
            grad = s - k * t
        else:
            if KIND == 2:
                a_shift = tl.where(in_row, s * inv_temperature - m_a, float("-inf"))
                q = tl.exp(a_shift - log_l_a)
                d_kd = q * (tl.where(in_row, a_shift - (t * inv_temperature - b_ref), 0.0) - k)
            else:
                q = tl.exp(s * inv_temperature - lse_a)
                d_kd = q - tl.exp(t * inv_temperature - lse_b)
            softmax_s = _softmax_s(s, q, lse_s, RAW_LSE)
            grad = kd_coef * d_kd + mlm_coef * (softmax_s - tl.where(cols == label, 1.0, 0.0))
        tl.store(s_row + cols, grad, mask=in_row)


@triton.jit
def vocab_kd_row_kernel(
    s_ptr, t_ptr, labels_ptr, kd_coef_ptr, mlm_coef_ptr, kd_row_ptr, mlm_row_ptr,
    stride_s, stride_t, V, inv_temperature, beta, log_beta, log_1m_beta,
    KIND: tl.constexpr,          # 0 KL, 1 soft CE, 2 reverse KL, 3 JSD (kdfast._reduction.KINDS)
    RAW_LSE: tl.constexpr,       # T != 1: the MLM term needs its own log-sum-exp of raw s
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    label = tl.load(labels_ptr + row).to(tl.int32)  # V < 2**31
    kd_coef = tl.load(kd_coef_ptr + row).to(tl.float32)
    mlm_coef = tl.where(label >= 0, tl.load(mlm_coef_ptr + row).to(tl.float32), 0.0)

    m_a, l_a, m_b, l_b, acc, m_s, l_s, b_ref, k = _stats_pass(s_row, t_row, V, inv_temperature, KIND, RAW_LSE,
                                                             BLOCK_V)
    lse_a = m_a + tl.log(l_a)
    lse_b = m_b + tl.log(l_b)
    if RAW_LSE:
        lse_s = m_s + tl.log(l_s)
    else:
        lse_s = lse_a
    s_label = tl.load(s_row + tl.maximum(label, 0)).to(tl.float32)  # before any pass overwrites it
    if KIND == 2:  # R = D_r + k, D_r = log q_r - log p_r
        k = k / l_a
        kd_row = k - tl.log(l_a) - ((b_ref - m_b) - tl.log(l_b))
    elif KIND == 3:
        k, kd_row = _jsd_pass(s_row, t_row, V, label, inv_temperature, m_a, l_a, m_b, l_b, b_ref, lse_s, kd_coef,
                              mlm_coef, beta, log_beta, log_1m_beta, RAW_LSE, BLOCK_V)
    elif KIND == 1:
        kd_row = acc / l_b + lse_a
    else:
        kd_row = acc / l_b - lse_b + lse_a
    tl.store(kd_row_ptr + row, kd_row)
    tl.store(mlm_row_ptr + row, tl.where(label >= 0, lse_s - s_label, 0.0))
    _grad_pass(s_row, t_row, V, label, inv_temperature, m_a, l_a, lse_a, lse_b, b_ref, lse_s, k, kd_coef, mlm_coef,
               KIND, RAW_LSE, BLOCK_V)


def block_size(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of ``vocab``: chunks of up to 2048 columns over 8 warps,
    i.e. 8 fp32 per thread per operand: 48-60 registers, no spills on sm_80/sm_90, high occupancy."""
    block = min(triton.next_power_of_2(max(vocab, 16)), 2048)
    return block, (8 if block == 2048 else 4)


# Reverse KL keeps more state across pass 1 (the online delta sums): at 2048 columns it spills 8 bytes on
# sm_90 (raw_lse), at 1024 none.
REVERSE_KL_MAX_BLOCK = (1024, 4)


# JSD at 1024 columns over 4 warps (V <= 1024) spilled 8 bytes on sm_90 (raw_lse); over 8 warps none.
JSD_MIN_WARPS = 8


def kind_block(kind: str, block: int, warps: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for ``kind`` from :func:`block_size`'s choice."""
    if kind == "jsd" and block >= 1024:
        return block, max(warps, JSD_MIN_WARPS)
    return REVERSE_KL_MAX_BLOCK if kind == "reverse_kl" and block > REVERSE_KL_MAX_BLOCK[0] else (block, warps)


def _vocab_kd_rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, kd_coef: torch.Tensor,
                   mlm_coef: torch.Tensor, temperature: float, kind: str,
                   beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    count, vocab = s.shape
    kd_row = new_output((count,), torch.float32, s.device)
    mlm_row = new_output((count,), torch.float32, s.device)
    if count == 0:
        return kd_row, mlm_row
    block, warps = kind_block(kind, *block_size(vocab))
    logs = (math.log(beta), math.log1p(-beta)) if 0.0 < beta < 1.0 else (0.0, 0.0)  # read by "jsd" only
    wrap_triton(vocab_kd_row_kernel)[(count,)](
        s, t, labels, kd_coef, mlm_coef, kd_row, mlm_row, s.stride(0), t.stride(0), vocab,
        1.0 / temperature, float(beta), *logs, KIND=KINDS.index(kind), RAW_LSE=temperature != 1.0, BLOCK_V=block,
        num_warps=warps)
    return kd_row, mlm_row


_op = triton_op("kdfast::vocab_kd_rows_triton", _vocab_kd_rows, mutates_args={"s", "t"})
_op.register_fake(fake_rows)


def rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, kd_coef: torch.Tensor, mlm_coef: torch.Tensor,
         temperature: float, kind: str, beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Row kernel (contract in kdfast/functions/vocab_kd/), the implementation of the triton_op
    ``kdfast::vocab_kd_rows_triton``, called directly (the driver runs inside a loss op):
    ``s``, ``t`` fp32 [C, V] with unit column stride; ``labels`` [C] int64 (-1: no MLM term);
    ``kd_coef``, ``mlm_coef`` [C] fp32; ``kind`` in ``KINDS``, ``beta`` in (0, 1) for ``"jsd"``.
    Overwrites ``s`` with the gradient and returns (kd_row, mlm_row), both fp32 [C]."""
    return _vocab_kd_rows(s, t, labels, kd_coef, mlm_coef, float(temperature), kind, float(beta))


_SIGNATURE = {"s_ptr": "*fp32", "t_ptr": "*fp32", "labels_ptr": "*i64", "kd_coef_ptr": "*fp32",
              "mlm_coef_ptr": "*fp32", "kd_row_ptr": "*fp32", "mlm_row_ptr": "*fp32", "stride_s": "i32",
              "stride_t": "i32", "V": "i32", "inv_temperature": "fp32", "beta": "fp32", "log_beta": "fp32",
              "log_1m_beta": "fp32", "KIND": "constexpr", "RAW_LSE": "constexpr", "BLOCK_V": "constexpr"}

STATIC_COMPILE_SPECS = list({spec.name: spec for spec in [  # reverse KL's two vocabularies share one block
    KernelSpec(f"vocab_kd_row[{kind},raw_lse={raw},block={block}]", vocab_kd_row_kernel,
               _SIGNATURE, {"KIND": KINDS.index(kind), "RAW_LSE": raw, "BLOCK_V": block}, num_warps=warps)
    for kind in KINDS for raw in (False, True)
    for block, warps in (kind_block(kind, *block_size(30522)), kind_block(kind, *block_size(1000)))
]}.values())
