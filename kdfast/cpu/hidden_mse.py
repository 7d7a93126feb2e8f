"""``hidden_mse`` on the ``cpu`` backend: the driver (``kdfast/functions/hidden_mse.py``: projection in torch, one
fused pass per row) on the kernel op ``kdfast::hidden_mse_rows``, whose CPU implementation runs ``kdfast._C``."""
from __future__ import annotations

from typing import Optional

import torch

from kdfast.functions.hidden_mse import decline
from kdfast.ops import hidden, hidden_kernels

rows = hidden_kernels.hidden_mse_rows  # the driver's row-kernel contract (op kdfast::hidden_mse_rows)


def unsupported_reason(h_s=None, h_t=None, **_) -> Optional[str]:
    return decline(h_s, h_t, "cpu")


def hidden_mse(h_s: torch.Tensor, h_t: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               mask: Optional[torch.Tensor]) -> torch.Tensor:
    return hidden.hidden_mse("cpu", h_s, h_t, weight, bias, mask)
