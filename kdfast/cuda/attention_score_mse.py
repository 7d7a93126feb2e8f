"""``attention_score_mse`` on the ``cuda`` backend: the float64 Gram-algebra kernels in ``kdfast._cuda``."""
from __future__ import annotations

from typing import Optional

import torch

from kdfast import _ext
from kdfast._buffers import new_output
from kdfast.functions.attention_score_mse import decline
from kdfast.ops import attention

MAX_HEAD_DIM = 128


def unsupported_reason(q_s=None, q_t=None, **_) -> Optional[str]:
    return decline(q_s, q_t, "cuda", MAX_HEAD_DIM)


def kernel(q_s, k_s, q_t, k_t, key_mask, alpha_s, alpha_t, grad_scale_q, grad_scale_k, with_grad):
    ext = _ext.require_cuda()
    q_s, k_s, q_t, k_t = (x.float() for x in (q_s, k_s, q_t, k_t))
    batch, heads, length, d_s = q_s.shape
    device = q_s.device
    n_pad = ext.attention_mse_padded_width(d_s + q_t.shape[-1])
    gram_q, gram_k = (new_output((batch * heads, n_pad, n_pad), torch.float64, device) for _ in range(2))
    energy = new_output((batch * heads,), torch.float64, device)
    dq_s = new_output(q_s.shape, torch.float32, device) if with_grad else None
    dk_s = new_output(q_s.shape, torch.float32, device) if with_grad else None
    mask = None if key_mask is None else key_mask.view(torch.uint8)
    with torch.cuda.device(device):
        ext.attention_mse_forward(
            q_s.data_ptr(), q_s.stride(), k_s.data_ptr(), k_s.stride(), q_t.data_ptr(), q_t.stride(),
            k_t.data_ptr(), k_t.stride(), 0 if mask is None else mask.data_ptr(),
            (0, 0) if mask is None else mask.stride(), (batch, heads, length, d_s, q_t.shape[-1]), alpha_s, alpha_t,
            grad_scale_q, grad_scale_k, gram_q.data_ptr(), gram_k.data_ptr(), energy.data_ptr(),
            0 if dq_s is None else dq_s.data_ptr(), 0 if dk_s is None else dk_s.data_ptr(),
            torch.cuda.current_stream(device).cuda_stream)
    return energy, dq_s, dk_s


def attention_score_mse(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                        key_mask: Optional[torch.Tensor], include_masked_keys: bool) -> torch.Tensor:
    return attention.attention_score_mse("cuda", q_s, k_s, q_t, k_t, key_mask, include_masked_keys)
