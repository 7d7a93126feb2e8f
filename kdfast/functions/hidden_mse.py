"""The kernel-backend driver of ``hidden_mse`` (op ``kdfast::hidden_mse``, ``kdfast/ops/hidden.py``),
shared by the ``cpu``, ``triton`` and ``cuda`` backends: they differ only in their row kernel.

The projection y = h_s W^T + b runs as one matmul; the row kernel then reads each projected row
once, turning it into d loss / d y in place while summing the squared error and the bias
gradient; d h_s = g W and d W = g^T h_s are two more matmuls. Nothing re-reads y. With fp32 inputs
and a student within CLOSE_RATIO of its teacher (where fp32 rounding of y would show in y - t), the
residual is formed again in float64 and the row kernel runs once more on it.

Row kernel contract (the kernel ops ``kdfast::hidden_mse_rows``, ``kdfast/ops/hidden_kernels.py``, and
``kdfast::hidden_mse_rows_triton``): ``rows(y, t, row_mask, grad_scale, grad, column_sum) -> loss_sum`` with
``y`` fp32 [N, W] (row stride free, unit column stride; None: the rows are read from ``grad``, in
place), ``t`` [N, W] any float dtype (row stride free, 0 included: one broadcast row), ``row_mask``
bool [N] or None, ``grad`` fp32 [N, W], ``column_sum`` fp32 [W] or None;
writes ``grad = grad_scale * (y - t)`` (0 on masked rows) and the column sums of ``grad``;
returns the float64 0-dim sum of ``(y - t)^2`` over kept rows.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from kdfast._buffers import new_output

RowKernel = Callable[..., torch.Tensor]


def reduce_partials(loss_part: torch.Tensor, column_part: Optional[torch.Tensor],
                    column_sum: Optional[torch.Tensor]) -> torch.Tensor:
    """A row kernel's result from its per-chunk partials, reduced in a fixed order (bitwise reproducible):
    the column sums into ``column_sum`` (when given) and the float64 0-dim loss sum, returned."""
    if column_sum is not None:
        column_sum.copy_(column_part.sum(0))
    return loss_part.sum()


def fake_rows(y, t, row_mask, grad_scale, grad, column_sum) -> torch.Tensor:
    """Fake implementation of the row-kernel ops: the float64 0-dim loss sum."""
    return grad.new_empty((), dtype=torch.float64)


def decline(h_s: Optional[torch.Tensor], h_t: Optional[torch.Tensor], backend: str) -> Optional[str]:
    """Why a kernel backend cannot take these inputs (float64); None without inputs."""
    if h_s is None or h_t is None:
        return None
    if torch.float64 in (h_s.dtype, h_t.dtype):
        return f"{backend} kernels take fp32/bf16/fp16 inputs, got float64"
    return None


# Below this ||y - t|| / ||t||, an fp32 projection's rounding (~2.5e-7 ||y||) would exceed ~2.5e-6 of the
# residual, so the residual is formed again in float64 (measured for K in 32..1024, tests/test_hidden_mse.py).
CLOSE_RATIO = 0.1


def _close_to_teacher(loss_sum: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether sum (y - t)^2 over kept rows is below CLOSE_RATIO^2 ||t||^2 (all rows: errs towards float64)."""
    return float(loss_sum) < CLOSE_RATIO**2 * float(torch.linalg.vector_norm(t)) ** 2  # no copy of t


def _float64_residual(x: torch.Tensor, t: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> "tuple[torch.Tensor, torch.Tensor]":
    """(y, target) for the row kernel with y - target = x W^T + b - t formed in float64 and rounded
    once: y is the residual, target a broadcast zero row (row stride 0)."""
    y64 = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
    residual = y64.sub_(t.double()).float()
    return residual, residual.new_zeros(1, residual.shape[1]).expand_as(residual)


def hidden_mse_pass(rows: RowKernel, h_s: torch.Tensor, h_t: torch.Tensor, weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                    needs: "tuple[bool, bool, bool]") -> "tuple[torch.Tensor, tuple]":
    """Mean over kept tokens x Ht of (proj(h_s) - h_t)^2 through the row kernel ``rows`` (fp32 scalar),
    and the gradients (d h_s, d weight, d bias) in the inputs' dtypes, None where ``needs`` is False."""
    row_mask = None if mask is None else mask.reshape(-1).contiguous()
    kept = h_s.shape[0] * h_s.shape[1] if mask is None else int(mask.sum())
    count = max(kept * h_t.shape[2], 1)
    x = h_s.reshape(-1, h_s.shape[2]).float().contiguous()
    t = h_t.reshape(-1, h_t.shape[2]).contiguous()
    if weight is None:
        grad = new_output(x.shape, torch.float32, x.device)
        loss_sum = rows(x, t, row_mask, 2.0 / count, grad, None)
        d_h_s, d_weight, d_bias = grad, None, None
    else:
        w = weight.float()
        y = torch.nn.functional.linear(x, w, None if bias is None else bias.float())
        d_bias = new_output((t.shape[1],), torch.float32, x.device) if needs[2] else None
        loss_sum = rows(None, t, row_mask, 2.0 / count, y, d_bias)  # y becomes d loss / d y
        if t.dtype == weight.dtype == torch.float32 and _close_to_teacher(loss_sum, t):
            y, target = _float64_residual(x, t, weight, bias)
            loss_sum = rows(None, target, row_mask, 2.0 / count, y, d_bias)
        d_h_s = y @ w if needs[0] else None
        d_weight = y.t() @ x if needs[1] else None
    grads = (d_h_s.reshape(h_s.shape).to(h_s.dtype) if needs[0] else None,
             d_weight.to(weight.dtype) if d_weight is not None else None,
             d_bias.to(bias.dtype) if d_bias is not None else None)
    return (loss_sum / count).to(torch.float32), grads
