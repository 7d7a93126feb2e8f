"""The native hidden-MSE row kernel as the custom op ``kdfast::hidden_mse_rows``: the C++/OpenMP kernel of
``kdfast._C`` for CPU tensors and the CUDA kernel of ``kdfast._cuda`` for CUDA tensors (the row-kernel
contract of ``kdfast/functions/hidden_mse.py``).

``hidden_mse_rows(y, t, row_mask, grad_scale, grad, column_sum) -> loss_sum``: ``y`` fp32 [N, W] (unit
column stride; None: the rows are read from ``grad``, which the kernel then overwrites in place), ``t``
[N, W] any float dtype (row stride 0 allowed: one broadcast row), ``row_mask`` bool [N] or None; writes
``grad`` (fp32 [N, W]) = grad_scale * (y - t), 0 on masked rows, and ``column_sum`` (fp32 [W] or None) = its
column sums; returns the float64 0-dim sum of (y - t)^2 over kept rows. It is the forward piece of the loss
op ``kdfast::hidden_mse`` (``kdfast/ops/hidden.py``), whose registered autograd formula scales the gradients
it keeps; it has no autograd formula of its own (not differentiable). The driver calls
:func:`hidden_mse_rows`, the op's implementation for the inputs' device, directly.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdfast import _ext
from kdfast._buffers import new_output
from kdfast.functions.hidden_mse import fake_rows, reduce_partials
from kdfast.ops._library import custom_op

OPS = ("kdfast::hidden_mse_rows",)


def _pointer(x: Optional[Tensor]) -> int:
    return 0 if x is None else x.data_ptr()


def _rows_cpu(y: Optional[Tensor], t: Tensor, row_mask: Optional[Tensor], grad_scale: float, grad: Tensor,
              column_sum: Optional[Tensor]) -> Tensor:
    y = grad if y is None else y
    t = t.float()
    loss_sum = _ext.require_cpu().hidden_mse_rows(y.data_ptr(), y.stride(0), t.data_ptr(), t.stride(0),
                                                  _pointer(row_mask), y.shape[0], y.shape[1], grad_scale,
                                                  grad.data_ptr(), grad.stride(0), _pointer(column_sum))
    return torch.tensor(loss_sum, dtype=torch.float64)


def _rows_cuda(y: Optional[Tensor], t: Tensor, row_mask: Optional[Tensor], grad_scale: float, grad: Tensor,
               column_sum: Optional[Tensor]) -> Tensor:
    extension = _ext.require_cuda()
    y = grad if y is None else y
    t = t.float()
    rows, width = y.shape
    chunk, block = extension.hidden_mse_chunk_rows(), extension.hidden_mse_column_block()
    parts = (-(-rows // chunk), -(-width // block))
    loss_part = new_output(parts, torch.float64, y.device)
    column_part = new_output((parts[0], width), torch.float32, y.device) if column_sum is not None else None
    with torch.cuda.device(y.device):
        extension.hidden_mse_rows(y.data_ptr(), y.stride(0), t.data_ptr(), t.stride(0), _pointer(row_mask), rows,
                                  width, grad_scale, grad.data_ptr(), grad.stride(0), loss_part.data_ptr(),
                                  _pointer(column_part), torch.cuda.current_stream(y.device).cuda_stream)
    return reduce_partials(loss_part, column_part, column_sum)


def hidden_mse_rows(y: Optional[Tensor], t: Tensor, row_mask: Optional[Tensor], grad_scale: float, grad: Tensor,
                    column_sum: Optional[Tensor]) -> Tensor:
    """The op's implementation for ``grad``'s device, which the driver calls directly: it runs inside the loss
    op (below autograd, never traced), where a second dispatch would add ~80 us of Python per call."""
    kernel = _rows_cuda if grad.device.type == "cuda" else _rows_cpu
    return kernel(y, t, row_mask, grad_scale, grad, column_sum)


_op = custom_op("kdfast::hidden_mse_rows", _rows_cpu, mutates_args=("grad", "column_sum"), device_types="cpu")
_op.register_kernel("cuda")(_rows_cuda)
_op.register_fake(fake_rows)
