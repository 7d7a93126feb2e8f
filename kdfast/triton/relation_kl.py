"""MiniLMv2 relation KL on the ``triton`` backend: the attention-KL kernels with q = k = x.

x_s [B, L, H_s] and x_t [B, L, H_t] are read in place as A_r relation heads of d = H / A_r
(strided views, no copy; student and teacher head sizes may differ and A_r need not equal the
models' attention heads). The backward writes dx = dq + dk in one buffer: the key pass adds the
query pass's result, so there are no atomics and no second gradient tensor.
"""
from __future__ import annotations

from typing import Optional

import torch

from kdfast._buffers import new_output
from kdfast.ops import attention
from kdfast.triton.attention_kl import (
    backward_grads,
    forward_rows,
    grad_scale,
    head_size_reason,
    mean_over_valid_rows,
    unit_last_stride,
)


def relation_heads(x: torch.Tensor, num_relation_heads: int) -> torch.Tensor:
    """[B, L, H] -> the view [B, A_r, L, H / A_r]."""
    return x.unflatten(2, (num_relation_heads, -1)).transpose(1, 2)


def forward(x_s, x_t, num_relation_heads, key_mask):
    """Op ``relation_kl``'s forward: (mean KL(R_t || R_s), lse_s, lse_t [B, A_r, L], row count n)."""
    x_s, x_t = unit_last_stride(x_s), unit_last_stride(x_t)
    heads_s, heads_t = relation_heads(x_s, num_relation_heads), relation_heads(x_t, num_relation_heads)
    kl, lse_s, lse_t = forward_rows(heads_s, heads_s, heads_t, heads_t, key_mask)
    loss, n = mean_over_valid_rows(kl, key_mask)
    return loss, lse_s, lse_t, n


def backward(grad_output, x_s, x_t, num_relation_heads, key_mask, lse_s, lse_t, n):
    """Op ``relation_kl``'s backward: d x_s from x_s, x_t and the two LSEs."""
    x_s, x_t = unit_last_stride(x_s), unit_last_stride(x_t)
    heads = num_relation_heads
    dx = new_output(x_s.shape, x_s.dtype, x_s.device)
    # dq goes to an fp32 buffer with dx's layout (dx itself when fp32); the key pass adds it.
    dq = dx if dx.dtype == torch.float32 else new_output(x_s.shape, torch.float32, x_s.device)
    heads_s, heads_t = relation_heads(x_s, heads), relation_heads(x_t, heads)
    backward_grads(heads_s, heads_s, heads_t, heads_t, key_mask, lse_s, lse_t, grad_scale(grad_output, n),
                   relation_heads(dq, heads), relation_heads(dx, heads), dk_adds_dq=True)
    return dx


def unsupported_reason(x_s: torch.Tensor, x_t: torch.Tensor, num_relation_heads: int,
                       key_mask: Optional[torch.Tensor] = None) -> Optional[str]:
    return head_size_reason(x_s.shape[2] // num_relation_heads, x_t.shape[2] // num_relation_heads,
                            (x_s.dtype, x_t.dtype), x_s.shape[0] * num_relation_heads)


def relation_kl(x_s: torch.Tensor, x_t: torch.Tensor, num_relation_heads: int,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over (B, A_r, valid rows) of KL(softmax(x_t x_t^T/sqrt(d_t)) || softmax(x_s x_s^T/sqrt(d_s)))."""
    return attention.relation_kl("triton", x_s, x_t, num_relation_heads, key_mask)
