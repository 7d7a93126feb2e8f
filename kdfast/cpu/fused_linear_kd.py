"""fused_linear_kd on the cpu backend: the chunked driver (kdfast/functions/vocab_kd/) with the
C++/OpenMP vocabulary-KD row kernel."""
from __future__ import annotations

from kdfast.functions.outputs import KDOutput
from kdfast.functions.vocab_kd import fused_unsupported_reason
from kdfast.ops import kernels, vocab

# Row kernel (contract in kdfast/functions/vocab_kd/), the custom op kdfast::vocab_kd_rows: s [C, V] becomes
# d loss / d s; returns kd_row, mlm_row [C].
# It takes both layouts; the fused driver fills vocab-major chunks (faster head products in MKL).
rows = kernels.row_kernel(kernels.vocab_kd_rows, vocab_major=True)


def fused_linear_kd(**kwargs) -> KDOutput:
    """``kdfast.fused_linear_kd`` on CPU tensors (validated keyword arguments)."""
    return vocab.fused_linear_kd("cpu", **kwargs)


unsupported_reason = fused_unsupported_reason  # float64 goes to backend 'torch'
