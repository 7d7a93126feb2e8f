"""Triton row kernel for vocabulary KD: loss per row and d loss / d student logits, in place.

One program per row walks the vocabulary in ``BLOCK_V`` chunks twice (see ``../shared/DESIGN.md``,
"Vocabulary KD: one row"), with a = s/T and b = t/T:

1. one online pass keeps running (max, sum) of exp(a) and exp(b) (and of exp(s) for the MLM
   log-sum-exp when T != 1), plus acc = sum exp(b - m_b)·(b - a) (KL) or sum exp(b - m_b)·(-a)
   (soft CE), all rescaled whenever a running max moves;
2. a second pass writes ``kd_coef·(q - p) + mlm_coef·(softmax(s) - onehot(y))`` over ``s``.

Teacher entries equal to -inf have p = 0 (top-k targets). All math is fp32: loads are cast to fp32
(the interpreter also needs this for bf16 reductions). :func:`rows` is this backend's row kernel
for the chunked driver (``kdfast/functions/vocab_kd.py``); it takes fp32 contiguous [C, V] logits.
No autotuning: the block size follows V, so importing never touches a GPU driver.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdfast._buffers import new_output
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
def vocab_kd_row_kernel(
    s_ptr, t_ptr, labels_ptr, kd_coef_ptr, mlm_coef_ptr, kd_row_ptr, mlm_row_ptr,
    stride_s, stride_t, V, inv_temperature,
    SOFT_CE: tl.constexpr,       # soft cross-entropy instead of KL
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
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        s = tl.load(s_row + cols, mask=in_row, other=0.0).to(tl.float32)
        t = tl.load(t_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        a = s * inv_temperature
        b = t * inv_temperature
        m_a, l_a, _, _ = _online_update(m_a, l_a, tl.where(in_row, a, float("-inf")))
        m_b, l_b, rescale_b, e_b = _online_update(m_b, l_b, b)
        if SOFT_CE:
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
    if SOFT_CE:
        kd_row = acc / l_b + lse_a
    else:
        kd_row = acc / l_b - lse_b + lse_a

    s_label = tl.load(s_row + tl.maximum(label, 0)).to(tl.float32)
    mlm_row = tl.where(label >= 0, lse_s - s_label, 0.0)
    tl.store(kd_row_ptr + row, kd_row)
    tl.store(mlm_row_ptr + row, mlm_row)

    # Pass 2: d loss / d s = kd_coef·(q - p) + mlm_coef·(softmax(s) - onehot(label)), over s.
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        s = tl.load(s_row + cols, mask=in_row, other=0.0).to(tl.float32)
        t = tl.load(t_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        q = tl.exp(s * inv_temperature - lse_a)
        p = tl.exp(t * inv_temperature - lse_b)
        if RAW_LSE:
            softmax_s = tl.exp(s - lse_s)
        else:
            softmax_s = q
        grad = kd_coef * (q - p) + mlm_coef * (softmax_s - tl.where(cols == label, 1.0, 0.0))
        tl.store(s_row + cols, grad, mask=in_row)


def block_size(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of ``vocab``: chunks of up to 2048 columns over 8 warps,
    i.e. 8 fp32 per thread per operand: 48-60 registers, no spills on sm_80/sm_90, high occupancy."""
    block = min(triton.next_power_of_2(max(vocab, 16)), 2048)
    return block, (8 if block == 2048 else 4)


def rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, kd_coef: torch.Tensor, mlm_coef: torch.Tensor,
         temperature: float, soft_ce: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Row kernel (contract in DEVELOPING.md): ``s``, ``t`` fp32 [C, V] with unit column stride;
    ``labels`` [C] int64 (-1: no MLM term); ``kd_coef``, ``mlm_coef`` [C] fp32.
    Overwrites ``s`` with the gradient and returns (kd_row, mlm_row), both fp32 [C]."""
    count, vocab = s.shape
    kd_row = new_output((count,), torch.float32, s.device)
    mlm_row = new_output((count,), torch.float32, s.device)
    if count == 0:
        return kd_row, mlm_row
    block, warps = block_size(vocab)
    vocab_kd_row_kernel[(count,)](
        s, t, labels, kd_coef, mlm_coef, kd_row, mlm_row, s.stride(0), t.stride(0), vocab,
        1.0 / temperature, SOFT_CE=bool(soft_ce), RAW_LSE=temperature != 1.0, BLOCK_V=block, num_warps=warps)
    return kd_row, mlm_row


_SIGNATURE = {"s_ptr": "*fp32", "t_ptr": "*fp32", "labels_ptr": "*i64", "kd_coef_ptr": "*fp32",
              "mlm_coef_ptr": "*fp32", "kd_row_ptr": "*fp32", "mlm_row_ptr": "*fp32", "stride_s": "i32",
              "stride_t": "i32", "V": "i32", "inv_temperature": "fp32", "SOFT_CE": "constexpr",
              "RAW_LSE": "constexpr", "BLOCK_V": "constexpr"}

STATIC_COMPILE_SPECS = [
    KernelSpec(f"vocab_kd_row[{'soft_ce' if soft_ce else 'kl'},raw_lse={raw},block={block}]", vocab_kd_row_kernel,
               _SIGNATURE, {"SOFT_CE": soft_ce, "RAW_LSE": raw, "BLOCK_V": block}, num_warps=warps)
    for soft_ce in (False, True) for raw in (False, True) for block, warps in (block_size(30522), block_size(1000))
]
