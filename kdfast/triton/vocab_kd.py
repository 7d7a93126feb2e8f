"""Triton row kernel for vocabulary KD: loss per row and d loss / d student logits, in place.

One program per row walks the vocabulary in ``BLOCK_V`` chunks twice (see ``../shared/DESIGN.md``,
"Vocabulary KD: one row"), with a = s/T and b = t/T:

1. one online pass keeps running (max, sum) of exp(a) and exp(b) (and of exp(s) for the MLM
   log-sum-exp when T != 1), plus acc = sum exp(b - m_b)·(b - a) (KL) or sum exp(b - m_b)·(-a)
   (soft CE), all rescaled whenever a running max moves;
2. a second pass writes ``kd_coef·(q - p) + mlm_coef·(softmax(s) - onehot(y))`` over ``s``.

Reverse KL and JSD (``KIND`` 2, 3; the math of ``csrc/vocab_kd_math.h``): pass 1 also keeps b_ref,
the teacher's b at the student's argmax; a second pass sums q·delta (and JSD's p terms), a third
writes ``kd_coef·w·q·(delta - sum q·delta) + mlm_coef·(softmax(s) - onehot(y))``.
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
from torch.library import wrap_triton

from kdfast._buffers import new_output
from kdfast._reduction import KINDS
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
def _softplus(z):
    """log(1 + exp(z)), 0 at z = -inf; log1p in Goldberg's form so tiny exp(z) stay exact."""
    e = tl.exp(tl.where(z > 0.0, -z, z))
    u = 1.0 + e
    return tl.maximum(z, 0.0) + tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _divergence_terms(s, t, in_row, inv_temperature, m_a, log_l_a, m_b, log_l_b, b_ref, sp_ref, log_beta, log_odds,
                      KIND: tl.constexpr):
    """Reverse KL (KIND 2) / JSD (3) per element: (q, delta, p_term), 0 past V. Log-softmaxes are taken
    as (x - max) - log(sum), which keeps them exact next to logits of 1e4."""
    a_shift = tl.where(in_row, s * inv_temperature - m_a, float("-inf"))
    b = t * inv_temperature
    q = tl.exp(a_shift - log_l_a)
    if KIND == 2:
        delta = a_shift - (b - b_ref)
        p_term = tl.zeros_like(q)
    else:
        log_p = (b - m_b) - log_l_b
        p = tl.exp(log_p)
        z = (log_p - (a_shift - log_l_a)) + log_odds
        delta = sp_ref - _softplus(z)
        p_term = tl.where(p > 0.0, p * (-log_beta - _softplus(-z)), 0.0)
    return q, tl.where(in_row, delta, 0.0), p_term


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

    # Pass 1: online max/sum for a = s/T, b = t/T (and raw s), and the rescaled KL accumulator.
    m_a = float("-inf")
    l_a = 0.0
    m_b = float("-inf")
    l_b = 0.0
    acc = 0.0
    m_s = float("-inf")
    l_s = 0.0
    b_ref = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        s = tl.load(s_row + cols, mask=in_row, other=0.0).to(tl.float32)
        t = tl.load(t_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        a = s * inv_temperature
        b = t * inv_temperature
        a_in = tl.where(in_row, a, float("-inf"))
        if KIND >= 2:  # b at the student's argmax
            block_max = tl.max(a_in, axis=0)
            b_ref = tl.where(block_max > m_a, tl.max(tl.where(a_in == block_max, b, float("-inf")), axis=0), b_ref)
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

    lse_a = m_a + tl.log(l_a)
    lse_b = m_b + tl.log(l_b)
    if RAW_LSE:
        lse_s = m_s + tl.log(l_s)
    else:
        lse_s = lse_a
    log_odds = log_beta - log_1m_beta
    sp_ref = 0.0
    k = 0.0
    if KIND == 3:  # z at the student's argmax: log p_r - log q_r + log(beta / (1 - beta)), log q_r = -log l_a
        sp_ref = _softplus(((b_ref - m_b) - tl.log(l_b)) + tl.log(l_a) + log_odds)
    if KIND >= 2:
        # Pass 2: k = sum q·delta (and JSD's sum of p terms).
        sum_p = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < V
            s = tl.load(s_row + cols, mask=in_row, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
            q, delta, p_term = _divergence_terms(s, t, in_row, inv_temperature, m_a, tl.log(l_a), m_b, tl.log(l_b),
                                                 b_ref, sp_ref, log_beta, log_odds, KIND)
            k += tl.sum(q * delta, axis=0)
            sum_p += tl.sum(p_term, axis=0)
        if KIND == 2:  # R = D_r + k, D_r = log q_r - log p_r
            kd_row = k - tl.log(l_a) - ((b_ref - m_b) - tl.log(l_b))
        else:
            kd_row = beta * sum_p + (1.0 - beta) * ((-log_1m_beta - sp_ref) + k)
    elif KIND == 1:
        kd_row = acc / l_b + lse_a
    else:
        kd_row = acc / l_b - lse_b + lse_a

    s_label = tl.load(s_row + tl.maximum(label, 0)).to(tl.float32)
    mlm_row = tl.where(label >= 0, lse_s - s_label, 0.0)
    tl.store(kd_row_ptr + row, kd_row)
    tl.store(mlm_row_ptr + row, mlm_row)

    # Last pass: d loss / d s = kd_coef·d kd_row / d a + mlm_coef·(softmax(s) - onehot(label)), over s.
    if KIND == 2:
        div_w = 1.0
    else:
        div_w = 1.0 - beta
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        s = tl.load(s_row + cols, mask=in_row, other=0.0).to(tl.float32)
        t = tl.load(t_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        if KIND >= 2:
            q, delta, _ = _divergence_terms(s, t, in_row, inv_temperature, m_a, tl.log(l_a), m_b, tl.log(l_b), b_ref,
                                            sp_ref, log_beta, log_odds, KIND)
            d_kd = div_w * q * (delta - k)
        else:
            q = tl.exp(s * inv_temperature - lse_a)
            d_kd = q - tl.exp(t * inv_temperature - lse_b)
        if RAW_LSE:
            softmax_s = tl.exp(s - lse_s)
        else:
            softmax_s = q
        grad = kd_coef * d_kd + mlm_coef * (softmax_s - tl.where(cols == label, 1.0, 0.0))
        tl.store(s_row + cols, grad, mask=in_row)


def block_size(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of ``vocab``: chunks of up to 2048 columns over 8 warps,
    i.e. 8 fp32 per thread per operand: 48-60 registers, no spills on sm_80/sm_90, high occupancy."""
    block = min(triton.next_power_of_2(max(vocab, 16)), 2048)
    return block, (8 if block == 2048 else 4)


@torch.library.triton_op("kdfast::vocab_kd_rows_triton", mutates_args={"s"})
def _vocab_kd_rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, kd_coef: torch.Tensor,
                   mlm_coef: torch.Tensor, temperature: float, kind: str,
                   beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    count, vocab = s.shape
    kd_row = new_output((count,), torch.float32, s.device)
    mlm_row = new_output((count,), torch.float32, s.device)
    if count == 0:
        return kd_row, mlm_row
    block, warps = block_size(vocab)
    logs = (math.log(beta), math.log1p(-beta)) if 0.0 < beta < 1.0 else (0.0, 0.0)  # read by "jsd" only
    wrap_triton(vocab_kd_row_kernel)[(count,)](
        s, t, labels, kd_coef, mlm_coef, kd_row, mlm_row, s.stride(0), t.stride(0), vocab,
        1.0 / temperature, float(beta), *logs, KIND=KINDS.index(kind), RAW_LSE=temperature != 1.0, BLOCK_V=block,
        num_warps=warps)
    return kd_row, mlm_row


def rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, kd_coef: torch.Tensor, mlm_coef: torch.Tensor,
         temperature: float, kind: str, beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Row kernel (contract in kdfast/functions/vocab_kd.py), the triton_op ``kdfast::vocab_kd_rows_triton``:
    ``s``, ``t`` fp32 [C, V] with unit column stride; ``labels`` [C] int64 (-1: no MLM term);
    ``kd_coef``, ``mlm_coef`` [C] fp32; ``kind`` in ``KINDS``, ``beta`` in (0, 1) for ``"jsd"``.
    Overwrites ``s`` with the gradient and returns (kd_row, mlm_row), both fp32 [C]."""
    return torch.ops.kdfast.vocab_kd_rows_triton(s, t, labels, kd_coef, mlm_coef, float(temperature), kind,
                                                 float(beta))


_SIGNATURE = {"s_ptr": "*fp32", "t_ptr": "*fp32", "labels_ptr": "*i64", "kd_coef_ptr": "*fp32",
              "mlm_coef_ptr": "*fp32", "kd_row_ptr": "*fp32", "mlm_row_ptr": "*fp32", "stride_s": "i32",
              "stride_t": "i32", "V": "i32", "inv_temperature": "fp32", "beta": "fp32", "log_beta": "fp32",
              "log_1m_beta": "fp32", "KIND": "constexpr", "RAW_LSE": "constexpr", "BLOCK_V": "constexpr"}

STATIC_COMPILE_SPECS = [
    KernelSpec(f"vocab_kd_row[{kind},raw_lse={raw},block={block}]", vocab_kd_row_kernel,
               _SIGNATURE, {"KIND": KINDS.index(kind), "RAW_LSE": raw, "BLOCK_V": block}, num_warps=warps)
    for kind in KINDS for raw in (False, True) for block, warps in (block_size(30522), block_size(1000))
]
