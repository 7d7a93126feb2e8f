"""fused_linear_kd on the cuda backend: the chunked driver (kdfast/functions/vocab_kd/) with the
CUDA extension (a block per row) vocabulary-KD row kernel."""
from __future__ import annotations

from kdfast.functions.outputs import KDOutput
from kdfast.functions.vocab_kd import fused_unsupported_reason
from kdfast.ops import kernels, vocab

# Row kernel (contract in kdfast/functions/vocab_kd/), the custom op kdfast::vocab_kd_rows: s [C, V] becomes
# d loss / d s; returns kd_row, mlm_row [C].
rows = kernels.row_kernel(kernels.vocab_kd_rows, vocab_major=False)


def fused_linear_kd(**kwargs) -> KDOutput:
    """``kdfast.fused_linear_kd`` on CUDA tensors (validated keyword arguments)."""
    return vocab.fused_linear_kd("cuda", **kwargs)


unsupported_reason = fused_unsupported_reason  # float64 goes to backend 'torch'
