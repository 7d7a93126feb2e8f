"""Triton kernels of the two-operand attention KL (DESIGN.md "Attention and relation KL").

Per (batch b, head h) a side is a strided view [L, d] of its tensor: element (i, c) of head (b, h)
sits at ``ptr + b*stride_b + h*stride_h + i*stride_l + c`` (last stride 1). That covers Q/K as
[B, h, L, d] and relation heads cut out of x [B, L, H] without a copy. For query row i and key j:

    s_ij = alpha_s * q_s,i . k_s,j        t_ij = alpha_t * q_t,i . k_t,j        (alpha = 1/sqrt(d))
    KL_i = sum_j p_t,ij (t_ij - s_ij) - lse_t,i + lse_s,i

Masked keys (``key_mask`` False) and keys past L are left out of both softmaxes.

* ``attention_kl_fwd``: one program per (query tile, b*h); one pass over key tiles with online
  (max, sum) for both softmaxes and the rescaled running sum of exp(t - m_t)(t - s) (centred on
  the maxima: KL_i = acc / l_t - log l_t + log l_s). Writes KL_i,
  lse_s,i and lse_t,i ([B, h, L] fp32 each).
* ``attention_kl_dq``: one program per query tile; dq_s,i = alpha_s * scale * sum_j dS_ij k_s,j.
* ``attention_kl_dk``: one program per key tile; dk_s,j = alpha_s * scale * sum_i dS_ij q_s,i
  (optionally plus a dq already stored there: the relation case, dx = dq + dk).

with dS_ij = valid_i * (p_s,ij - p_t,ij) recomputed from the stored LSEs and ``scale`` = g / n
(one fp32 on the device). Each gradient element is written by exactly one program: no atomics, so
gradients are bitwise reproducible.

Constexprs: ``DOT_FP32`` casts every loaded tile to fp32 (always under ``TRITON_INTERPRET=1``; on a
GPU only for fp32 inputs, so bf16/fp16 tiles feed the tensor cores directly). fp32 operands use
``FP32_DOT`` = "tf32x3" (three TF32 products: fp32 accuracy on the tensor cores; the interpreter
multiplies in fp32 anyway).
"""
from __future__ import annotations

import triton
import triton.language as tl

FP32_DOT: tl.constexpr = tl.constexpr("tf32x3")


@triton.jit
def _head_ptr(ptr, b, h, stride_b, stride_h):
    """Base pointer of head (b, h); 64-bit offsets so tensors past 2^31 elements work."""
    return ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _load_rows(base, rows, stride_l, L, d, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """Rows ``rows`` of a [L, d] head as a [len(rows), BLOCK_D] tile; zero outside (L, d)."""
    cols = tl.arange(0, BLOCK_D)
    tile = tl.load(base + rows[:, None] * stride_l + cols[None, :],
                   mask=(rows[:, None] < L) & (cols[None, :] < d), other=0.0)
    if DOT_FP32:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _store_rows(base, rows, stride_l, L, d, tile, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    tl.store(base + rows[:, None] * stride_l + cols[None, :], tile.to(base.dtype.element_ty),
             mask=(rows[:, None] < L) & (cols[None, :] < d))


@triton.jit
def _heads(QS, KS, QT, KT, MASK, stride_qs_b, stride_qs_h, stride_ks_b, stride_ks_h,
           stride_qt_b, stride_qt_h, stride_kt_b, stride_kt_h, stride_mask_b, H):
    """Program axis 1 runs over b*H + h: (b, h, bases of q_s, k_s, q_t, k_t, this batch's mask row)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    return (b, h, _head_ptr(QS, b, h, stride_qs_b, stride_qs_h), _head_ptr(KS, b, h, stride_ks_b, stride_ks_h),
            _head_ptr(QT, b, h, stride_qt_b, stride_qt_h), _head_ptr(KT, b, h, stride_kt_b, stride_kt_h),
            MASK + b.to(tl.int64) * stride_mask_b)


@triton.jit
def _load_pair(s_head, t_head, idx, stride_s_l, stride_t_l, L, D_S, D_T,
               BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, DOT_FP32: tl.constexpr):
    """Rows ``idx`` of a student head [L, d_s] and of a teacher head [L, d_t]."""
    return (_load_rows(s_head, idx, stride_s_l, L, D_S, BLOCK_DS, DOT_FP32),
            _load_rows(t_head, idx, stride_t_l, L, D_T, BLOCK_DT, DOT_FP32))


@triton.jit
def _load_lse(LSE_S, LSE_T, b, h, H, L, rows):
    """Stored lse_s, lse_t of query rows ``rows`` of head (b, h) ([B, H, L] fp32)."""
    stats = (b * H + h).to(tl.int64) * L + rows
    return (tl.load(LSE_S + stats, mask=rows < L, other=0.0), tl.load(LSE_T + stats, mask=rows < L, other=0.0))


@triton.jit
def _valid(mask_row, idx, L, HAS_MASK: tl.constexpr):
    """True for positions < L that the key-padding mask keeps."""
    ok = idx < L
    if HAS_MASK:
        ok = ok & (tl.load(mask_row + idx, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _scores(q_s, k_s, q_t, k_t, alpha_s, alpha_t):
    """Student and teacher score tiles [rows, keys], fp32."""
    s = tl.dot(q_s, tl.trans(k_s), input_precision=FP32_DOT) * alpha_s
    t = tl.dot(q_t, tl.trans(k_t), input_precision=FP32_DOT) * alpha_t
    return s, t


@triton.jit
def _dscores(q_s, k_s, q_t, k_t, lse_s, lse_t, row_ok, key_ok, alpha_s, alpha_t):
    """dS = valid_i * (p_s - p_t) on a [rows, keys] tile, from the stored log-sum-exps."""
    s, t = _scores(q_s, k_s, q_t, k_t, alpha_s, alpha_t)
    ok = row_ok[:, None] & key_ok[None, :]
    p_s = tl.exp(tl.where(ok, s - lse_s[:, None], float("-inf")))
    p_t = tl.exp(tl.where(ok, t - lse_t[:, None], float("-inf")))
    return p_s - p_t


@triton.jit
def attention_kl_fwd(
    QS, KS, QT, KT, MASK, KL, LSE_S, LSE_T,
    stride_qs_b, stride_qs_h, stride_qs_l, stride_ks_b, stride_ks_h, stride_ks_l,
    stride_qt_b, stride_qt_h, stride_qt_l, stride_kt_b, stride_kt_h, stride_kt_l,
    stride_mask_b, H, L, D_S, D_T, alpha_s, alpha_t,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    b, h, q_s_head, k_s_head, q_t_head, k_t_head, mask_row = _heads(
        QS, KS, QT, KT, MASK, stride_qs_b, stride_qs_h, stride_ks_b, stride_ks_h,
        stride_qt_b, stride_qt_h, stride_kt_b, stride_kt_h, stride_mask_b, H)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_s, q_t = _load_pair(q_s_head, q_t_head, rows, stride_qs_l, stride_qt_l, L, D_S, D_T, BLOCK_DS, BLOCK_DT, DOT_FP32)

    # Finite start for the maxima: a tile of only masked keys (-inf) then adds exp(-inf) = 0.
    m_s = tl.full([BLOCK_M], -1e30, tl.float32)
    m_t = tl.full([BLOCK_M], -1e30, tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    # acc = sum_j exp(t - m_t) ((t - m_t) - (s - m_s)): centred on the running maxima, so the
    # maxima cancel exactly (KL = 0 for L = 1) and student ~ teacher loses no digits.
    acc = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, L, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = _valid(mask_row, keys, L, HAS_MASK)[None, :]
        k_s, k_t = _load_pair(k_s_head, k_t_head, keys, stride_ks_l, stride_kt_l, L, D_S, D_T,
                              BLOCK_DS, BLOCK_DT, DOT_FP32)
        s, t = _scores(q_s, k_s, q_t, k_t, alpha_s, alpha_t)
        m_s_new = tl.maximum(m_s, tl.max(tl.where(key_ok, s, float("-inf")), 1))
        m_t_new = tl.maximum(m_t, tl.max(tl.where(key_ok, t, float("-inf")), 1))
        centred = tl.where(key_ok, (t - m_t_new[:, None]) - (s - m_s_new[:, None]), 0.0)
        s = tl.where(key_ok, s, float("-inf"))
        t = tl.where(key_ok, t, float("-inf"))

        rescale_t = tl.exp(m_t - m_t_new)
        e_t = tl.exp(t - m_t_new[:, None])
        acc = rescale_t * (acc - ((m_t_new - m_t) - (m_s_new - m_s)) * l_t) + tl.sum(e_t * centred, 1)
        l_t = l_t * rescale_t + tl.sum(e_t, 1)
        l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s - m_s_new[:, None]), 1)
        m_s = m_s_new
        m_t = m_t_new

    # A row without any valid key (its whole batch row masked) gets KL 0 and LSEs 0.
    has_keys = l_t > 0
    l_s = tl.where(has_keys, l_s, 1.0)
    l_t = tl.where(has_keys, l_t, 1.0)
    lse_s = tl.where(has_keys, m_s + tl.log(l_s), 0.0)
    lse_t = tl.where(has_keys, m_t + tl.log(l_t), 0.0)
    kl = acc / l_t - tl.log(l_t) + tl.log(l_s)
    out = (b * H + h).to(tl.int64) * L + rows
    in_range = rows < L
    tl.store(KL + out, kl, mask=in_range)
    tl.store(LSE_S + out, lse_s, mask=in_range)
    tl.store(LSE_T + out, lse_t, mask=in_range)


@triton.jit
def attention_kl_dq(
    QS, KS, QT, KT, MASK, LSE_S, LSE_T, SCALE, DQ,
    stride_qs_b, stride_qs_h, stride_qs_l, stride_ks_b, stride_ks_h, stride_ks_l,
    stride_qt_b, stride_qt_h, stride_qt_l, stride_kt_b, stride_kt_h, stride_kt_l,
    stride_dq_b, stride_dq_h, stride_dq_l,
    stride_mask_b, H, L, D_S, D_T, alpha_s, alpha_t,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    b, h, q_s_head, k_s_head, q_t_head, k_t_head, mask_row = _heads(
        QS, KS, QT, KT, MASK, stride_qs_b, stride_qs_h, stride_ks_b, stride_ks_h,
        stride_qt_b, stride_qt_h, stride_kt_b, stride_kt_h, stride_mask_b, H)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_s, q_t = _load_pair(q_s_head, q_t_head, rows, stride_qs_l, stride_qt_l, L, D_S, D_T, BLOCK_DS, BLOCK_DT, DOT_FP32)
    row_ok = _valid(mask_row, rows, L, HAS_MASK)
    lse_s, lse_t = _load_lse(LSE_S, LSE_T, b, h, H, L, rows)

    dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    for start in range(0, L, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = _valid(mask_row, keys, L, HAS_MASK)
        k_s, k_t = _load_pair(k_s_head, k_t_head, keys, stride_ks_l, stride_kt_l, L, D_S, D_T,
                              BLOCK_DS, BLOCK_DT, DOT_FP32)
        ds = _dscores(q_s, k_s, q_t, k_t, lse_s, lse_t, row_ok, key_ok, alpha_s, alpha_t)
        dq = tl.dot(ds.to(k_s.dtype), k_s, dq, input_precision=FP32_DOT)

    dq = dq * (alpha_s * tl.load(SCALE))
    _store_rows(_head_ptr(DQ, b, h, stride_dq_b, stride_dq_h), rows, stride_dq_l, L, D_S, dq, BLOCK_DS)


@triton.jit
def attention_kl_dk(
    QS, KS, QT, KT, MASK, LSE_S, LSE_T, SCALE, DQ, DK,
    stride_qs_b, stride_qs_h, stride_qs_l, stride_ks_b, stride_ks_h, stride_ks_l,
    stride_qt_b, stride_qt_h, stride_qt_l, stride_kt_b, stride_kt_h, stride_kt_l,
    stride_dk_b, stride_dk_h, stride_dk_l,
    stride_mask_b, H, L, D_S, D_T, alpha_s, alpha_t,
    HAS_MASK: tl.constexpr, ADD_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """``ADD_DQ``: add the fp32 dq stored at DQ (same strides as DK) to this tile before storing."""
    b, h, q_s_head, k_s_head, q_t_head, k_t_head, mask_row = _heads(
        QS, KS, QT, KT, MASK, stride_qs_b, stride_qs_h, stride_ks_b, stride_ks_h,
        stride_qt_b, stride_qt_h, stride_kt_b, stride_kt_h, stride_mask_b, H)
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_s, k_t = _load_pair(k_s_head, k_t_head, keys, stride_ks_l, stride_kt_l, L, D_S, D_T, BLOCK_DS, BLOCK_DT, DOT_FP32)
    key_ok = _valid(mask_row, keys, L, HAS_MASK)

    dk = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    for start in range(0, L, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = _valid(mask_row, rows, L, HAS_MASK)
        q_s, q_t = _load_pair(q_s_head, q_t_head, rows, stride_qs_l, stride_qt_l, L, D_S, D_T,
                              BLOCK_DS, BLOCK_DT, DOT_FP32)
        lse_s, lse_t = _load_lse(LSE_S, LSE_T, b, h, H, L, rows)
        ds = _dscores(q_s, k_s, q_t, k_t, lse_s, lse_t, row_ok, key_ok, alpha_s, alpha_t)
        dk = tl.dot(tl.trans(ds).to(q_s.dtype), q_s, dk, input_precision=FP32_DOT)

    dk = dk * (alpha_s * tl.load(SCALE))
    if ADD_DQ:
        dk += _load_rows(_head_ptr(DQ, b, h, stride_dk_b, stride_dk_h), keys, stride_dk_l, L, D_S, BLOCK_DS, True)
    _store_rows(_head_ptr(DK, b, h, stride_dk_b, stride_dk_h), keys, stride_dk_l, L, D_S, dk, BLOCK_DS)
