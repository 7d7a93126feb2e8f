"""fused_linear_kd on the cpu backend: the chunked driver (kdfast/functions/vocab_kd.py) with the
C++/OpenMP vocabulary-KD row kernel."""
from __future__ import annotations

from kdfast import _ext
from kdfast.functions.outputs import KDOutput
from kdfast.functions.vocab_kd import chunked_fused_linear_kd, fused_unsupported_reason, pointer_row_kernel

# Row kernel (contract in kdfast/functions/vocab_kd.py): s [C, V] becomes d loss / d s; returns kd_row, mlm_row [C].
# It takes both layouts; the fused driver fills vocab-major chunks (faster head products in MKL).
rows = pointer_row_kernel(lambda *args: _ext.require_cpu().vocab_kd_rows(*args), with_stream=False,
                          launch_vocab_major=lambda *args: _ext.require_cpu().vocab_kd_rows_vocab_major(*args))


def fused_linear_kd(**kwargs) -> KDOutput:
    """``kdfast.fused_linear_kd`` on CPU tensors (validated keyword arguments)."""
    return chunked_fused_linear_kd(rows, **kwargs)


unsupported_reason = fused_unsupported_reason  # float64 goes to backend 'torch'
