"""``hidden_mse`` on the ``cpu`` backend: projection in MKL (torch), one fused C++ pass per row."""
from __future__ import annotations

from typing import Optional

import torch

from kdfast import _ext
from kdfast.functions.hidden_mse import decline
from kdfast.ops import hidden


def unsupported_reason(h_s=None, h_t=None, **_) -> Optional[str]:
    return decline(h_s, h_t, "cpu")


def rows(y, t, row_mask, grad_scale, grad, column_sum) -> torch.Tensor:
    t = t.float()
    loss_sum = _ext.require_cpu().hidden_mse_rows(
        y.data_ptr(), y.stride(0), t.data_ptr(), t.stride(0), 0 if row_mask is None else row_mask.data_ptr(),
        y.shape[0], y.shape[1], grad_scale, grad.data_ptr(), grad.stride(0),
        0 if column_sum is None else column_sum.data_ptr())
    return torch.tensor(loss_sum, dtype=torch.float64)


def hidden_mse(h_s: torch.Tensor, h_t: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               mask: Optional[torch.Tensor]) -> torch.Tensor:
    return hidden.hidden_mse("cpu", h_s, h_t, weight, bias, mask)
