"""Reference MiniLM attention-distribution KL, materialising the [B, h, L, L] scores."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kdfast.reference._common import compute_dtype, masked_fill_min


def _scores(q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype, key_mask) -> torch.Tensor:
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * q.shape[-1] ** -0.5
    return masked_fill_min(s, key_mask)


def attention_kl(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                 key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    dtype = compute_dtype(q_s, k_s, q_t, k_t)
    log_q = F.log_softmax(_scores(q_s, k_s, dtype, key_mask), dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax(_scores(q_t, k_t, dtype, key_mask), dim=-1)
    rows = (log_p.exp() * (log_p - log_q)).sum(-1)  # [B, h, L]
    heads = q_s.shape[1]
    if key_mask is None:
        return rows.sum() / max(rows.numel(), 1)
    valid = key_mask[:, None, :].expand_as(rows)
    return rows[valid].sum() / max(int(key_mask.sum()) * heads, 1)
