"""The two-operand attention KL on the native backends (forward and backward of ops
``kdfast::attention_kl`` and ``kdfast::relation_kl``, ``kdfast/ops/attention.py``).

One driver serves ``cpu`` (``kdfast._C``) and ``cuda`` (``kdfast._cuda``); a :class:`Kernels`
names the extension and how it gets its stream. The forward stores only the two log-sum-exps per
row ([B, h, L] fp32 each); the backward recomputes the score tiles from them. Relations
(MiniLMv2) are the case k = q on a strided [B, A_r, L, d_r] view of x [B, L, H]: no copy, and
the kernel sums the query and key gradients into one buffer.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Optional

import torch

from kdfast._buffers import new_output

MAX_HEAD_SIZE = 128
STORAGE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@dataclass(frozen=True)
class Kernels:
    """An extension with ``attention_kl_forward``/``attention_kl_backward`` and the trailing
    launch arguments it wants for a device (the CUDA stream handle; nothing on CPU)."""
    module: Callable[[], ModuleType]
    launch_args: Callable[[torch.device], tuple] = lambda device: ()


def unsupported_reason(d_s: int, d_t: int, dtypes: tuple[torch.dtype, ...]) -> Optional[str]:
    """Why the native kernels decline these head sizes / dtypes, or None."""
    if max(d_s, d_t) > MAX_HEAD_SIZE:
        return (f"head sizes d_s={d_s}, d_t={d_t}: expected d <= {MAX_HEAD_SIZE} on a kernel backend; "
                "use backend='torch' for larger heads")
    bad = [d for d in dtypes if d not in STORAGE]
    if bad:
        return f"dtype {bad[0]}: expected float32, bfloat16 or float16 on a kernel backend; use backend='torch'"
    return None


def relation_heads(x: torch.Tensor, num_relation_heads: int) -> torch.Tensor:
    """Strided view [B, A_r, L, H / A_r] of x [B, L, H] (no copy when the last dim is contiguous)."""
    b, length, width = x.shape
    return x.view(b, length, num_relation_heads, width // num_relation_heads).transpose(1, 2)


def _operand(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), STORAGE[x.dtype], x.shape[-1], x.stride(0), x.stride(1), x.stride(2))


def _grad_target(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), x.stride(0), x.stride(1), x.stride(2))


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _rows(key_mask: Optional[torch.Tensor], batch: int, heads: int, length: int, device) -> torch.Tensor:
    """Number of (head, valid query row) pairs, at least 1, as a device tensor (no host sync)."""
    if key_mask is None:
        return torch.tensor(float(max(batch * heads * length, 1)), device=device)
    return (key_mask.sum(dtype=torch.float32) * heads).clamp_min(1.0)


def _operands(q_s, k_s, q_t, k_t, key_mask):
    """Inputs with unit last stride (k_s None: k = q, relation) and a contiguous mask."""
    q_s, q_t = _last_dim_contiguous(q_s), _last_dim_contiguous(q_t)
    k_s = q_s if k_s is None else _last_dim_contiguous(k_s)
    k_t = q_t if k_t is None else _last_dim_contiguous(k_t)
    return q_s, k_s, q_t, k_t, None if key_mask is None else key_mask.contiguous()


def forward(kernels: Kernels, q_s, k_s, q_t, k_t, key_mask):
    """Mean KL over (B, h, valid rows) and what the backward reads: (loss, lse_s, lse_t, rows), the
    log-sum-exps [B, h, L] fp32 and the 0-dim fp32 row count. ``k_s``/``k_t`` None mean k = q."""
    same_qk = k_s is None
    q_s, k_s, q_t, k_t, mask = _operands(q_s, k_s, q_t, k_t, key_mask)
    batch, heads, length, _ = q_s.shape
    kl_rows, lse_s, lse_t = (new_output((batch, heads, length), torch.float32, q_s.device) for _ in range(3))
    kernels.module().attention_kl_forward(
        _operand(q_s), _operand(k_s), _operand(q_t), _operand(k_t), same_qk,
        0 if mask is None else mask.data_ptr(), batch, heads, length,
        kl_rows.data_ptr(), lse_s.data_ptr(), lse_t.data_ptr(), *kernels.launch_args(q_s.device))
    rows = _rows(mask, batch, heads, length, q_s.device)
    return (kl_rows.sum(dtype=torch.float64) / rows).float(), lse_s, lse_t, rows


def backward(kernels: Kernels, grad_loss, q_s, k_s, q_t, k_t, key_mask, lse_s, lse_t, rows):
    """(d q_s, d k_s) in the inputs' dtypes; with ``k_s`` None (k = q) one gradient, the sum of both,
    and None."""
    same_qk = k_s is None
    q_s, k_s, q_t, k_t, mask = _operands(q_s, k_s, q_t, k_t, key_mask)
    batch, heads, length, _ = q_s.shape
    if same_qk:  # one fp32 buffer laid out like q_s's storage: dq and dk sum into it
        dq = dk = _like_strided_fp32(q_s)
    else:
        dq = new_output(q_s.shape, torch.float32, q_s.device)
        dk = new_output(k_s.shape, torch.float32, k_s.device)
    kernels.module().attention_kl_backward(
        _operand(q_s), _operand(k_s), _operand(q_t), _operand(k_t), same_qk,
        0 if mask is None else mask.data_ptr(), batch, heads, length,
        lse_s.data_ptr(), lse_t.data_ptr(), 1.0, _grad_target(dq), _grad_target(dk),
        *kernels.launch_args(q_s.device))
    scale = grad_loss.float() / rows
    grad_q = dq.mul_(scale).to(q_s.dtype)
    return grad_q, None if same_qk else dk.mul_(scale).to(k_s.dtype)


def _like_strided_fp32(x: torch.Tensor) -> torch.Tensor:
    """An fp32 output with x's strides (a [B, A_r, L, d] view of a fresh [B, L, H] buffer for relations)."""
    batch, heads, length, d = x.shape
    if x.stride() == (length * heads * d, d, heads * d, 1):  # relation view of a contiguous [B, L, H]
        return new_output((batch, length, heads * d), torch.float32, x.device).view(
            batch, length, heads, d).transpose(1, 2)
    return new_output(x.shape, torch.float32, x.device)


def relation_forward(kernels: Kernels, x_s: torch.Tensor, x_t: torch.Tensor, num_relation_heads: int,
                     key_mask: Optional[torch.Tensor]):
    """:func:`forward` of op ``relation_kl``: attention KL with q = k on strided head views of x [B, L, H]."""
    x_s, x_t = x_s.contiguous(), x_t.contiguous()
    return forward(kernels, relation_heads(x_s, num_relation_heads), None, relation_heads(x_t, num_relation_heads),
                   None, key_mask)


def relation_backward(kernels: Kernels, grad_loss, x_s, x_t, num_relation_heads, key_mask, lse_s, lse_t, rows):
    """d x_s [B, L, H_s] of op ``relation_kl``."""
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
