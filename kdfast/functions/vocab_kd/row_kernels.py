"""Row kernels (contract in the package docstring): their type, the adapter of native entry points that
take raw pointers, the check of a kernel's arguments, and the ops' fake implementation."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from kdfast._buffers import new_output
from kdfast._reduction import KINDS

RowKernel = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


def pointer_row_kernel(launch: Callable[..., None], with_stream: bool,
                       launch_vocab_major: Optional[Callable[..., None]] = None) -> RowKernel:
    """A row kernel from a native entry point taking raw pointers:
    ``launch(s, t, labels, kd_coef, mlm_coef, kd_row, mlm_row, rows, vocab, ld, temperature, kind, beta[, stream])``
    (``kind`` as its index in ``KINDS``)
    for row-major ``s``, ``t`` (rows ``ld`` elements apart); ``stream``: the current CUDA stream's handle
    when ``with_stream``. ``launch_vocab_major``, with the same arguments, takes vocab-major ones
    (vocabulary entries ``ld`` elements apart) and makes the kernel ``vocab_major``."""

    def rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, kd_coef: torch.Tensor, mlm_coef: torch.Tensor,
             temperature: float, kind: str, beta: float = 0.5) -> "tuple[torch.Tensor, torch.Tensor]":
        row_major = s.stride(1) == 1
        kd_row, mlm_row = row_kernel_outputs(s, t, labels, kd_coef, mlm_coef, vocab_major=rows.vocab_major)
        args = [s.data_ptr(), t.data_ptr(), labels.data_ptr(), kd_coef.data_ptr(), mlm_coef.data_ptr(),
                kd_row.data_ptr(), mlm_row.data_ptr(), s.shape[0], s.shape[1], s.stride(0 if row_major else 1),
                float(temperature), KINDS.index(kind), float(beta)]
        if with_stream:
            args.append(torch.cuda.current_stream(s.device).cuda_stream)
        (launch if row_major else launch_vocab_major)(*args)
        return kd_row, mlm_row

    rows.vocab_major = launch_vocab_major is not None
    return rows


def fake_rows(s: torch.Tensor, t, labels, kd_coef, mlm_coef, temperature, kind, beta) -> "tuple[torch.Tensor, ...]":
    """Fake implementation of the row-kernel ops (C++/CUDA and Triton): ``kd_row``, ``mlm_row`` fp32 [C]."""
    return s.new_empty((s.shape[0],)), s.new_empty((s.shape[0],))


def row_kernel_outputs(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, kd_coef: torch.Tensor,
                       mlm_coef: torch.Tensor, vocab_major: bool = False) -> "tuple[torch.Tensor, torch.Tensor]":
    """Check a row kernel's arguments against the contract (they go to native code as raw pointers)
    and allocate its outputs ``kd_row``, ``mlm_row`` [C] fp32. ``vocab_major``: the kernel also takes
    ``s``, ``t`` with unit stride along C."""
    rows = s.shape[0]
    if s.dtype != torch.float32 or t.dtype != torch.float32 or s.shape != t.shape or s.dim() != 2:
        raise ValueError(f"row kernel: expected fp32 s, t of one shape [C, V], got {s.dtype} {tuple(s.shape)} "
                         f"and {t.dtype} {tuple(t.shape)}")
    unit = s.stride(1) == 1 or (vocab_major and s.stride(0) == 1)
    if not unit or t.stride() != s.stride():
        expected = "unit stride along V or C" if vocab_major else "unit column stride"
        raise ValueError(f"row kernel: expected s, t with {expected} and equal strides, got {s.stride()} and "
                         f"{t.stride()}")
    for name, value, dtype in (("labels", labels, torch.int64), ("kd_coef", kd_coef, torch.float32),
                               ("mlm_coef", mlm_coef, torch.float32)):
        if value.dtype != dtype or value.shape != (rows,) or not value.is_contiguous() or value.device != s.device:
            raise ValueError(f"row kernel: {name}: expected contiguous {dtype} [{rows}] on {s.device}, got "
                             f"{value.dtype} {tuple(value.shape)} on {value.device}")
    return new_output((rows,), torch.float32, s.device), new_output((rows,), torch.float32, s.device)
