"""The native vocabulary-KD row kernel as the custom op ``kdfast::vocab_kd_rows`` (contract in
``kdfast/functions/vocab_kd/``): the C++/OpenMP kernel of ``kdfast._C`` for CPU tensors (row- or
vocab-major ``s``, ``t``) and the CUDA kernel of ``kdfast._cuda`` for CUDA tensors (row-major).
It overwrites ``s`` with d loss / d s, uses ``t`` as scratch (both in ``mutates_args``) and returns
(kd_row, mlm_row) [C] fp32; it is not differentiable (the loss ops call it inside their forward).
The Triton kernel is the ``triton_op`` ``kdfast::vocab_kd_rows_triton`` (``kdfast/triton/vocab_kd.py``)."""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from kdfast import _ext
from kdfast.functions.vocab_kd import RowKernel, fake_rows, pointer_row_kernel
from kdfast.ops._library import custom_op

OPS = ("kdfast::vocab_kd_rows",)

_CPU = pointer_row_kernel(lambda *args: _ext.require_cpu().vocab_kd_rows(*args), with_stream=False,
                          launch_vocab_major=lambda *args: _ext.require_cpu().vocab_kd_rows_vocab_major(*args))
_CUDA = pointer_row_kernel(lambda *args: _ext.require_cuda().vocab_kd_rows(*args), with_stream=True)


def _rows_cpu(s: Tensor, t: Tensor, labels: Tensor, kd_coef: Tensor, mlm_coef: Tensor, temperature: float, kind: str,
              beta: float) -> tuple[Tensor, Tensor]:
    return _CPU(s, t, labels, kd_coef, mlm_coef, temperature, kind, beta)


def vocab_kd_rows(s: Tensor, t: Tensor, labels: Tensor, kd_coef: Tensor, mlm_coef: Tensor, temperature: float,
                  kind: str, beta: float) -> tuple[Tensor, Tensor]:
    """The op's implementation for ``s``'s device, which the driver calls directly: it runs inside the loss
    ops (below autograd, never traced), where a dispatch per chunk would add ~80 us of Python."""
    return (_CUDA if s.device.type == "cuda" else _CPU)(s, t, labels, kd_coef, mlm_coef, temperature, kind, beta)


_op = custom_op("kdfast::vocab_kd_rows", _rows_cpu, mutates_args=("s", "t"), device_types="cpu")
_op.register_kernel("cuda")(_CUDA)
_op.register_fake(fake_rows)


def row_kernel(op: Callable[..., "tuple[Tensor, Tensor]"], vocab_major: bool) -> RowKernel:
    """The driver's row kernel calling ``op`` (a kernel op's implementation, with this module's arguments);
    ``vocab_major``: it also takes ``s``, ``t`` with unit stride along C."""

    def rows(s: Tensor, t: Tensor, labels: Tensor, kd_coef: Tensor, mlm_coef: Tensor, temperature: float,
             kind: str, beta: float = 0.5) -> "tuple[Tensor, Tensor]":
        return op(s, t, labels, kd_coef, mlm_coef, float(temperature), kind, float(beta))

    rows.vocab_major = vocab_major
    return rows
