"""The two-operand attention KL on the native backends (forward and backward of ops
``kdfast::attention_kl`` and ``kdfast::relation_kl``, ``kdfast/ops/attention.py``).

One driver serves ``cpu`` and ``cuda``: it calls the implementations of the kernel ops
``kdfast::attention_kl_rows`` and ``kdfast::attention_kl_rows_backward``, passed in as ``kernels`` (the
module ``kdfast/ops/attention_kernels.py``: they run ``kdfast._C`` or ``kdfast._cuda`` by device). The
forward stores only the two log-sum-exps per row ([B, h, L] fp32 each); the backward recomputes the score
tiles from them. Relations (MiniLMv2) are the case k = q on a strided [B, A_r, L, d_r] view of x [B, L, H]:
no copy, and the kernel sums the query and key gradients into one buffer.
"""
from __future__ import annotations

from typing import Optional

import torch

MAX_HEAD_SIZE = 128
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported_reason(d_s: int, d_t: int, dtypes: tuple[torch.dtype, ...]) -> Optional[str]:
    """Why the native kernels decline these head sizes / dtypes, or None."""
    if max(d_s, d_t) > MAX_HEAD_SIZE:
        return (f"head sizes d_s={d_s}, d_t={d_t}: expected d <= {MAX_HEAD_SIZE} on a kernel backend; "
                "use backend='torch' for larger heads")
    bad = [d for d in dtypes if d not in SUPPORTED_DTYPES]
    if bad:
        return f"dtype {bad[0]}: expected float32, bfloat16 or float16 on a kernel backend; use backend='torch'"
    return None


def relation_heads(x: torch.Tensor, num_relation_heads: int) -> torch.Tensor:
    """Strided view [B, A_r, L, H / A_r] of x [B, L, H] (no copy when the last dim is contiguous)."""
    b, length, width = x.shape
    return x.view(b, length, num_relation_heads, width // num_relation_heads).transpose(1, 2)


def _rows(key_mask: Optional[torch.Tensor], batch: int, heads: int, length: int, device) -> torch.Tensor:
    """Number of (head, valid query row) pairs, at least 1, as a device tensor (no host sync)."""
    if key_mask is None:
        return torch.tensor(float(max(batch * heads * length, 1)), device=device)
    return (key_mask.sum(dtype=torch.float32) * heads).clamp_min(1.0)


def forward(kernels, q_s, k_s, q_t, k_t, key_mask):
    """Mean KL over (B, h, valid rows) and what the backward reads: (loss, lse_s, lse_t, rows), the
    log-sum-exps [B, h, L] fp32 and the 0-dim fp32 row count. ``k_s``/``k_t`` None mean k = q."""
    kl_rows, lse_s, lse_t = kernels.attention_kl_rows(q_s, k_s, q_t, k_t, key_mask)
    rows = _rows(key_mask, *q_s.shape[:3], q_s.device)
    return (kl_rows.sum(dtype=torch.float64) / rows).float(), lse_s, lse_t, rows


def backward(kernels, grad_loss, q_s, k_s, q_t, k_t, key_mask, lse_s, lse_t, rows):
    """(d q_s, d k_s) in the inputs' dtypes; with ``k_s`` None (k = q) one gradient, the sum of both,
    and None."""
    dq, dk = kernels.attention_kl_rows_backward(q_s, k_s, q_t, k_t, key_mask, lse_s, lse_t, 1.0)
    scale = grad_loss.float() / rows
    return dq.mul_(scale).to(q_s.dtype), None if k_s is None else dk.mul_(scale).to(k_s.dtype)


def relation_forward(kernels, x_s: torch.Tensor, x_t: torch.Tensor, num_relation_heads: int,
                     key_mask: Optional[torch.Tensor]):
    """:func:`forward` of op ``relation_kl``: attention KL with q = k on strided head views of x [B, L, H]."""
    x_s, x_t = x_s.contiguous(), x_t.contiguous()
    return forward(kernels, relation_heads(x_s, num_relation_heads), None, relation_heads(x_t, num_relation_heads),
                   None, key_mask)


def relation_backward(kernels, grad_loss, x_s, x_t, num_relation_heads, key_mask, lse_s, lse_t, rows):
    """d x_s [B, L, H_s] of op ``relation_kl`` (the kernel op writes it as a head view of a [B, L, H_s] buffer)."""
    x_s, x_t = x_s.contiguous(), x_t.contiguous()
    grad, _ = backward(kernels, grad_loss, relation_heads(x_s, num_relation_heads), None,
                       relation_heads(x_t, num_relation_heads), None, key_mask, lse_s, lse_t, rows)
    return grad.transpose(1, 2).reshape(x_s.shape)


def attention_kl_unsupported(q_s=None, k_s=None, q_t=None, k_t=None, key_mask=None) -> Optional[str]:
    """``unsupported_reason`` of op attention_kl (None when asked without inputs)."""
    if q_s is None or q_t is None:
        return None
    return unsupported_reason(q_s.shape[-1], q_t.shape[-1], (q_s.dtype, q_t.dtype))


def relation_kl_unsupported(x_s=None, x_t=None, num_relation_heads=1, key_mask=None) -> Optional[str]:
    """``unsupported_reason`` of op relation_kl (None when asked without inputs)."""
    if x_s is None or x_t is None:
        return None
    return unsupported_reason(x_s.shape[-1] // num_relation_heads, x_t.shape[-1] // num_relation_heads,
                              (x_s.dtype, x_t.dtype))
