"""fused_linear_kd on CPU: the chunked driver (kdfast/chunked_vocab.py) with the C++/OpenMP row kernel."""
from __future__ import annotations

from typing import Optional

import torch

from kdfast import _ext
from kdfast.chunked_vocab import chunked_fused_linear_kd, row_kernel_outputs
from kdfast.chunked_vocab import unsupported_reason as _decline_float64
from kdfast.losses.types import KDOutput


def rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, kd_coef: torch.Tensor, mlm_coef: torch.Tensor,
         temperature: float, soft_ce: bool) -> "tuple[torch.Tensor, torch.Tensor]":
    """Row kernel (contract in kdfast/chunked_vocab.py): s [C, V] becomes d loss / d s; returns kd_row, mlm_row [C]."""
    kd_row, mlm_row = row_kernel_outputs(s, t, labels, kd_coef, mlm_coef)
    _ext.require_cpu().vocab_kd_rows(s.data_ptr(), t.data_ptr(), labels.data_ptr(), kd_coef.data_ptr(),
                                     mlm_coef.data_ptr(), kd_row.data_ptr(), mlm_row.data_ptr(), s.shape[0],
                                     s.shape[1], s.stride(0), float(temperature), bool(soft_ce))
    return kd_row, mlm_row


def fused_linear_kd(**kwargs) -> KDOutput:
    """``kdfast.fused_linear_kd`` on CPU tensors (validated keyword arguments)."""
    return chunked_fused_linear_kd(rows, **kwargs)


def unsupported_reason(**kwargs) -> Optional[str]:
    return _decline_float64(kwargs.get("student_hidden"), kwargs.get("teacher_hidden"))
