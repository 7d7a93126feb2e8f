"""Reference TinyBERT attention-score MSE, materialising the [B, h, L, L] scores."""
from __future__ import annotations

from typing import Optional

import torch

from kdfast.reference._common import compute_dtype


def attention_score_mse(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                        key_mask: Optional[torch.Tensor] = None,
                        include_masked_keys: bool = False) -> torch.Tensor:
    dtype = compute_dtype(q_s, k_s, q_t, k_t)
    s = torch.matmul(q_s.to(dtype), k_s.to(dtype).transpose(-1, -2)) * q_s.shape[-1] ** -0.5
    with torch.no_grad():
        t = torch.matmul(q_t.to(dtype), k_t.to(dtype).transpose(-1, -2)) * q_t.shape[-1] ** -0.5
    diff = s - t
    if key_mask is not None and not include_masked_keys:
        diff = diff * key_mask[:, None, None, :].to(dtype)
    return diff.pow(2).mean()
