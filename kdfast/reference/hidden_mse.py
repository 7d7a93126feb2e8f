"""Reference hidden-state MSE with an optional linear projection of the student."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kdfast.reference._common import compute_dtype


def hidden_mse(h_s: torch.Tensor, h_t: torch.Tensor, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    dtype = compute_dtype(h_s, h_t, *(t for t in (weight, bias) if t is not None))
    if mask is not None:
        h_s, h_t = h_s[mask], h_t[mask]
    x = h_s.to(dtype)
    if weight is not None:
        x = F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
    diff = x - h_t.detach().to(dtype)
    return diff.pow(2).sum() / max(diff.numel(), 1)
