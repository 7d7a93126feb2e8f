"""``attention_score_mse`` on the ``cpu`` backend: the float64 Gram-algebra kernel in ``kdfast._C``."""
from __future__ import annotations

from typing import Optional

import torch

from kdfast import _ext
from kdfast._buffers import new_output
from kdfast.functions.attention_score_mse import decline
from kdfast.ops import attention


def unsupported_reason(q_s=None, q_t=None, **_) -> Optional[str]:
    return decline(q_s, q_t, "cpu", max_head_dim=None)


def kernel(q_s, k_s, q_t, k_t, key_mask, alpha_s, alpha_t, grad_scale_q, grad_scale_k, with_grad):
    q_s, k_s, q_t, k_t = (x.float() for x in (q_s, k_s, q_t, k_t))
    batch, heads, length, d_s = q_s.shape
    energy = new_output((batch * heads,), torch.float64, q_s.device)
    dq_s = new_output(q_s.shape, torch.float32, q_s.device) if with_grad else None
    dk_s = new_output(q_s.shape, torch.float32, q_s.device) if with_grad else None
    mask_ptr, mask_stride = (0, (0, 0)) if key_mask is None else (key_mask.data_ptr(), key_mask.stride())
    _ext.require_cpu().attention_mse_forward(
        q_s.data_ptr(), q_s.stride(), k_s.data_ptr(), k_s.stride(), q_t.data_ptr(), q_t.stride(),
        k_t.data_ptr(), k_t.stride(), mask_ptr, mask_stride,
        (batch, heads, length, d_s, q_t.shape[-1]), alpha_s, alpha_t, grad_scale_q, grad_scale_k,
        energy.data_ptr(), 0 if dq_s is None else dq_s.data_ptr(), 0 if dk_s is None else dk_s.data_ptr())
    return energy, dq_s, dk_s


def attention_score_mse(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                        key_mask: Optional[torch.Tensor], include_masked_keys: bool) -> torch.Tensor:
    return attention.attention_score_mse("cpu", q_s, k_s, q_t, k_t, key_mask, include_masked_keys)
