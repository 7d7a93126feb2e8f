"""MiniLMv2 relation KL on the ``triton`` backend: the attention-KL kernel ops (``kdfast/triton/attention_kl.py``)
with q = k = x.

x_s [B, L, H_s] and x_t [B, L, H_t] are read in place as A_r relation heads of d = H / A_r
(strided views, no copy; student and teacher head sizes may differ and A_r need not equal the
models' attention heads). The backward writes dx = dq + dk in one buffer: the key pass adds the
query pass's result, so there are no atomics and no second gradient tensor.
"""
from __future__ import annotations

from typing import Optional

import torch

from kdfast.ops import attention
from kdfast.triton.attention_kl import backward as attention_backward
from kdfast.triton.attention_kl import forward as attention_forward
from kdfast.triton.attention_kl import head_size_reason, unit_last_stride


def relation_heads(x: torch.Tensor, num_relation_heads: int) -> torch.Tensor:
    """[B, L, H] -> the view [B, A_r, L, H / A_r]."""
    return x.unflatten(2, (num_relation_heads, -1)).transpose(1, 2)


def forward(x_s, x_t, num_relation_heads, key_mask):
    """Op ``relation_kl``'s forward: (mean KL(R_t || R_s), lse_s, lse_t [B, A_r, L], row count n)."""
    x_s, x_t = unit_last_stride(x_s), unit_last_stride(x_t)
    return attention_forward(relation_heads(x_s, num_relation_heads), None, relation_heads(x_t, num_relation_heads),
                             None, key_mask)


def backward(grad_output, x_s, x_t, num_relation_heads, key_mask, lse_s, lse_t, n):
    """Op ``relation_kl``'s backward: d x_s from x_s, x_t and the two LSEs (the kernel op writes it as a head
    view of a [B, L, H_s] buffer when x_s is dense, so the reshape copies nothing)."""
    x_s, x_t = unit_last_stride(x_s), unit_last_stride(x_t)
    dx, _ = attention_backward(grad_output, relation_heads(x_s, num_relation_heads), None,
                               relation_heads(x_t, num_relation_heads), None, key_mask, lse_s, lse_t, n)
    return dx.transpose(1, 2).reshape(x_s.shape)


def unsupported_reason(x_s: torch.Tensor, x_t: torch.Tensor, num_relation_heads: int,
                       key_mask: Optional[torch.Tensor] = None) -> Optional[str]:
    return head_size_reason(x_s.shape[2] // num_relation_heads, x_t.shape[2] // num_relation_heads,
                            (x_s.dtype, x_t.dtype), x_s.shape[0] * num_relation_heads)


def relation_kl(x_s: torch.Tensor, x_t: torch.Tensor, num_relation_heads: int,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over (B, A_r, valid rows) of KL(softmax(x_t x_t^T/sqrt(d_t)) || softmax(x_s x_s^T/sqrt(d_s)))."""
    return attention.relation_kl("triton", x_s, x_t, num_relation_heads, key_mask)
