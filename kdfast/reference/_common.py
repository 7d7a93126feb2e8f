"""Small helpers for the reference backend."""
from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are never reduced in 16 bits)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def masked_fill_min(scores: torch.Tensor, key_mask) -> torch.Tensor:
    """Masked keys get the dtype's lowest finite value: exp() makes them exactly 0, and a
    fully masked row stays finite (no NaN leaks into gradients through ``where``)."""
    if key_mask is None:
        return scores
    return scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
