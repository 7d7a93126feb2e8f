"""The kernel-backend driver of ``attention_score_mse`` (Gram algebra, DESIGN.md), shared by the
``cpu``, ``triton`` and ``cuda`` backends: they differ only in the kernel they pass in.

Kernel contract: ``kernel(q_s, k_s, q_t, k_t, key_mask, alpha_s, alpha_t, grad_scale_q, grad_scale_k,
with_grad) -> (head_energy [B*h] float64, dq_s, dk_s)`` where, per (batch, head),
``E = ||alpha_s Q_s K_s^T - alpha_t Q_t K_t^T||_F^2`` over kept keys (``key_mask`` None keeps all),
and, when ``with_grad``, ``dq_s = grad_scale_q * (X GK)[:, :d_s]``, ``dk_s = grad_scale_k * (Y GQ)[:, :d_s]``
as fp32 [B, h, L, d_s] (see csrc/attention_mse_math.h); else both are None.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from kdfast.functions.grad_in_forward import GradInForward

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


def attention_score_mse_with(kernel: Kernel, q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor,
                             k_t: torch.Tensor, key_mask: Optional[torch.Tensor],
                             include_masked_keys: bool) -> torch.Tensor:
    """Mean over (B, h, L, L) of the squared score difference, through ``kernel``; fp32 scalar."""
    batch, heads, length, d_s = q_s.shape
    count = batch * heads * length * length
    alpha_s, alpha_t = d_s ** -0.5, q_t.shape[-1] ** -0.5
    mask = None if include_masked_keys else key_mask

    def compute(needs, q_s, k_s, q_t, k_t):
        energy, dq_s, dk_s = kernel(q_s, k_s, q_t, k_t, mask, alpha_s, alpha_t, 2.0 * alpha_s / count,
                                    2.0 / count, needs[0] or needs[1])
        loss = (energy.sum() / count).to(torch.float32)
        return loss, (dq_s.to(q_s.dtype) if needs[0] else None, dk_s.to(k_s.dtype) if needs[1] else None,
                      None, None)

    return GradInForward.apply(compute, q_s, k_s, q_t.detach(), k_t.detach())
