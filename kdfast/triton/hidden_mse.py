"""``hidden_mse`` on the ``triton`` backend: the projection in cuBLAS (torch), then one fused pass.

``_rows_kernel`` reads each (projected) student row once with its teacher row, writes
grad = grad_scale * (y - t) (in place of y when asked; 0 on masked rows), and stores per-program
partials (CHUNK_ROWS rows x BLOCK_W columns) of the squared-error sum and of the column sums of
grad (the bias gradient).
The partials are reduced in a fixed order by torch, so results are bitwise reproducible.
The launcher is the ``triton_op`` ``kdfast::hidden_mse_rows_triton(y, t, row_mask, grad_scale, grad,
column_sum) -> loss_sum`` (the row-kernel contract of ``kdfast/functions/hidden_mse.py``; ``grad`` and
``column_sum`` mutated), with an explicit fake implementation and no autograd formula: it is the forward
piece of the loss op ``kdfast::hidden_mse``, whose registered formula scales the gradients it keeps.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kdfast._buffers import new_output
from kdfast.functions.hidden_mse import decline, fake_rows, reduce_partials
from kdfast.ops import hidden
from kdfast.ops._library import triton_op, wrap_triton
from kdfast.triton.static import KernelSpec

CHUNK_ROWS = 256  # rows per program (and per deterministic partial)
BLOCK_R = 16
BLOCK_W = 64


@triton.jit
def _rows_kernel(y_ptr, y_ld, t_ptr, t_ld, mask_ptr, grad_ptr, grad_ld, loss_part_ptr, column_part_ptr,
                 rows_total, width, grad_scale, HAS_MASK: tl.constexpr, HAS_COLUMNS: tl.constexpr,
                 CHUNK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    chunk = tl.program_id(0)
    col_block = tl.program_id(1)
    cols = col_block * BLOCK_W + tl.arange(0, BLOCK_W)
    col_in = cols < width
    loss = tl.zeros((BLOCK_W,), dtype=tl.float64)
    column_sum = tl.zeros((BLOCK_W,), dtype=tl.float32)
    for start in range(0, CHUNK_ROWS, BLOCK_R):
        rows = chunk * CHUNK_ROWS + start + tl.arange(0, BLOCK_R)
        row_in = rows < rows_total
        keep = row_in
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + rows, mask=row_in, other=0) != 0)
        rows64 = rows.to(tl.int64)
        load_mask = keep[:, None] & col_in[None, :]
        y = tl.load(y_ptr + rows64[:, None] * y_ld + cols[None, :], mask=load_mask, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + rows64[:, None] * t_ld + cols[None, :], mask=load_mask, other=0.0).to(tl.float32)
        diff = y - t
        loss += tl.sum(diff * diff, axis=0).to(tl.float64)  # fp32 over BLOCK_R rows, float64 across
        grad = grad_scale * diff
        column_sum += tl.sum(grad, axis=0)
        tl.store(grad_ptr + rows64[:, None] * grad_ld + cols[None, :], grad, mask=row_in[:, None] & col_in[None, :])
    tl.store(loss_part_ptr + chunk * tl.num_programs(1) + col_block, tl.sum(loss, axis=0))
    if HAS_COLUMNS:
        tl.store(column_part_ptr + chunk.to(tl.int64) * width + cols, column_sum, mask=col_in)


def hidden_mse_rows(y: Optional[torch.Tensor], t: torch.Tensor, row_mask: Optional[torch.Tensor], grad_scale: float,
                     grad: torch.Tensor, column_sum: Optional[torch.Tensor]) -> torch.Tensor:
    y = grad if y is None else y
    rows, width = y.shape
    grid = (triton.cdiv(rows, CHUNK_ROWS), triton.cdiv(width, BLOCK_W))
    loss_part = new_output(grid, torch.float64, y.device)
    column_part = new_output((grid[0], width), torch.float32, y.device) if column_sum is not None else loss_part
    mask = row_mask.view(torch.uint8) if row_mask is not None else y
    wrap_triton(_rows_kernel)[grid](y, y.stride(0), t, t.stride(0), mask, grad, grad.stride(0), loss_part,
                                    column_part, rows, width, grad_scale, HAS_MASK=row_mask is not None,
                                    HAS_COLUMNS=column_sum is not None, CHUNK_ROWS=CHUNK_ROWS, BLOCK_R=BLOCK_R,
                                    BLOCK_W=BLOCK_W)
    return reduce_partials(loss_part, column_part, column_sum)


_op = triton_op("kdfast::hidden_mse_rows_triton", hidden_mse_rows, mutates_args=("grad", "column_sum"))
_op.register_fake(fake_rows)

rows = hidden_mse_rows  # the driver's row-kernel contract (kdfast/functions/hidden_mse.py), called directly


def unsupported_reason(h_s=None, h_t=None, **_) -> Optional[str]:
    return decline(h_s, h_t, "triton")


def hidden_mse(h_s: torch.Tensor, h_t: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               mask: Optional[torch.Tensor]) -> torch.Tensor:
    return hidden.hidden_mse("triton", h_s, h_t, weight, bias, mask)


def _specs() -> list[KernelSpec]:
    specs = []
    for t_type in ("*fp32", "*bf16"):
        flags = {"HAS_MASK": True, "HAS_COLUMNS": True, "CHUNK_ROWS": CHUNK_ROWS, "BLOCK_R": BLOCK_R,
                 "BLOCK_W": BLOCK_W}
        types = {"y_ptr": "*fp32", "y_ld": "i32", "t_ptr": t_type, "t_ld": "i32", "mask_ptr": "*u8",
                 "grad_ptr": "*fp32", "grad_ld": "i32", "loss_part_ptr": "*fp64", "column_part_ptr": "*fp32",
                 "rows_total": "i32", "width": "i32", "grad_scale": "fp32"}
        signature = {n: "constexpr" if n in flags else types[n] for n in _rows_kernel.arg_names}
        specs.append(KernelSpec(f"hidden_mse_rows_{t_type[1:]}", _rows_kernel, signature, flags))
    return specs


STATIC_COMPILE_SPECS = _specs()
