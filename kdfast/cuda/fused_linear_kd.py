"""fused_linear_kd on the cuda backend: the chunked driver (kdfast/functions/vocab_kd.py) with the
CUDA extension (a block per row) vocabulary-KD row kernel."""
from __future__ import annotations

from kdfast import _ext
from kdfast.functions.outputs import KDOutput
from kdfast.functions.vocab_kd import chunked_fused_linear_kd, fused_unsupported_reason, pointer_row_kernel

# Row kernel (contract in kdfast/functions/vocab_kd.py): s [C, V] becomes d loss / d s; returns kd_row, mlm_row [C].
rows = pointer_row_kernel(lambda *args: _ext.require_cuda().vocab_kd_rows(*args), with_stream=True)


def fused_linear_kd(**kwargs) -> KDOutput:
    """``kdfast.fused_linear_kd`` on CUDA tensors (validated keyword arguments)."""
    return chunked_fused_linear_kd(rows, **kwargs)


unsupported_reason = fused_unsupported_reason  # float64 goes to backend 'torch'
