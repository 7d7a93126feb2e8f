"""``fused_linear_kd`` on the Triton backend: the shared chunked driver (``kdfast/functions/vocab_kd/``:
fp32 torch matmuls per chunk of selected rows, gradients accumulated in fp32) with the Triton row
kernel of ``kdfast.triton.vocab_kd`` for the softmaxes, the KL/soft-CE, the MLM CE and d loss/d logits.
float64 inputs are declined (backend ``torch`` serves them)."""
from __future__ import annotations

from typing import Optional

from kdfast.functions import vocab_kd
from kdfast.functions.outputs import KDOutput
from kdfast.ops import vocab
from kdfast.triton.vocab_kd import rows  # noqa: F401  (the row kernel the op looks up)


def fused_linear_kd(**kwargs) -> KDOutput:
    """``kdfast.fused_linear_kd`` with its validated keyword arguments (minus ``backend``)."""
    return vocab.fused_linear_kd("triton", **kwargs)


def unsupported_reason(**kwargs) -> Optional[str]:
    return vocab_kd.unsupported_reason(kwargs["student_hidden"], kwargs["student_weight"],
                                            kwargs["teacher_hidden"], kwargs["teacher_weight"])
