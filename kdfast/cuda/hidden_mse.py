"""``hidden_mse`` on the ``cuda`` backend: projection in cuBLAS (torch), the fused row pass in ``kdfast._cuda``."""
from __future__ import annotations

from typing import Optional

import torch

from kdfast import _ext
from kdfast._buffers import new_output
from kdfast.functions.hidden_mse import decline
from kdfast.ops import hidden


def unsupported_reason(h_s=None, h_t=None, **_) -> Optional[str]:
    return decline(h_s, h_t, "cuda")


def rows(y, t, row_mask, grad_scale, grad, column_sum) -> torch.Tensor:
    ext = _ext.require_cuda()
    t = t.float()
    rows, width = y.shape
    chunk, block = ext.hidden_mse_chunk_rows(), ext.hidden_mse_column_block()
    parts = (-(-rows // chunk), -(-width // block))
    loss_part = new_output(parts, torch.float64, y.device)
    column_part = new_output((parts[0], width), torch.float32, y.device) if column_sum is not None else None
    with torch.cuda.device(y.device):
        ext.hidden_mse_rows(y.data_ptr(), y.stride(0), t.data_ptr(), t.stride(0),
                            0 if row_mask is None else row_mask.data_ptr(), rows, width, grad_scale, grad.data_ptr(),
                            grad.stride(0), loss_part.data_ptr(), 0 if column_part is None else column_part.data_ptr(),
                            torch.cuda.current_stream(y.device).cuda_stream)
    if column_sum is not None:
        column_sum.copy_(column_part.sum(0))
    return loss_part.sum()


def hidden_mse(h_s: torch.Tensor, h_t: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               mask: Optional[torch.Tensor]) -> torch.Tensor:
    return hidden.hidden_mse("cuda", h_s, h_t, weight, bias, mask)
