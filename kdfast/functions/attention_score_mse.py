"""The kernel-backend driver of ``attention_score_mse`` (Gram algebra, DESIGN.md; op
``kdfast::attention_score_mse``, ``kdfast/ops/attention.py``), shared by the
``cpu``, ``triton`` and ``cuda`` backends: they differ only in the kernel they pass in.

Kernel contract (the kernel ops ``kdfast::attention_mse_gram``, ``kdfast/ops/attention_kernels.py``, and
``kdfast::attention_mse_gram_triton``): ``kernel(q_s, k_s, q_t, k_t, key_mask, alpha_s, alpha_t,
grad_scale_q, grad_scale_k, with_grad) -> (head_energy [B*h] float64, dq_s, dk_s)`` where, per (batch, head),
``E = ||alpha_s Q_s K_s^T - alpha_t Q_t K_t^T||_F^2`` over kept keys (``key_mask`` None keeps all),
and, when ``with_grad``, ``dq_s = grad_scale_q * (X GK)[:, :d_s]``, ``dk_s = grad_scale_k * (Y GQ)[:, :d_s]``
as fp32 [B, h, L, d_s] (see csrc/attention_mse_math.h); else both are unused (None or [0] tensors).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

Kernel = Callable[..., tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]


def decline(q_s: Optional[torch.Tensor], q_t: Optional[torch.Tensor], backend: str,
            max_head_dim: Optional[int]) -> Optional[str]:
    """Why a kernel backend cannot take these inputs (float64, or a head size above its limit);
    None without inputs (a bare availability query)."""
    if q_s is None or q_t is None:
        return None
    if torch.float64 in (q_s.dtype, q_t.dtype):
        return f"{backend} kernels take fp32/bf16/fp16 inputs, got float64"
    if max_head_dim is not None and max(q_s.shape[-1], q_t.shape[-1]) > max_head_dim:
        return (f"q_s/q_t: expected head sizes d <= {max_head_dim} on backend {backend!r}, "
                f"got d_s={q_s.shape[-1]}, d_t={q_t.shape[-1]}")
    return None


def attention_score_mse_pass(kernel: Kernel, q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor,
                             k_t: torch.Tensor, key_mask: Optional[torch.Tensor], include_masked_keys: bool,
                             needs: "tuple[bool, bool]") -> "tuple[torch.Tensor, tuple]":
    """Mean over (B, h, L, L) of the squared score difference through ``kernel`` (fp32 scalar), and
    the gradients (d q_s, d k_s) in the inputs' dtypes, None where ``needs`` is False."""
    batch, heads, length, d_s = q_s.shape
    count = batch * heads * length * length
    alpha_s, alpha_t = d_s ** -0.5, q_t.shape[-1] ** -0.5
    mask = None if include_masked_keys else key_mask
    energy, dq_s, dk_s = kernel(q_s, k_s, q_t, k_t, mask, alpha_s, alpha_t, 2.0 * alpha_s / count, 2.0 / count,
                                needs[0] or needs[1])
    loss = (energy.sum() / count).to(torch.float32)
    return loss, (dq_s.to(q_s.dtype) if needs[0] else None, dk_s.to(k_s.dtype) if needs[1] else None)
