"""kd_kl on CPU: the C++/OpenMP vocabulary-KD row kernel on given logits."""
from __future__ import annotations

from typing import Optional

import torch

from kdfast.chunked_vocab import chunked_kd_kl
from kdfast.chunked_vocab import unsupported_reason as _decline_float64
from kdfast.cpu.fused_linear_kd import rows


def kd_kl(**kwargs) -> torch.Tensor:
    """``kdfast.kd_kl`` on CPU tensors (validated keyword arguments)."""
    return chunked_kd_kl(rows, **kwargs)


def unsupported_reason(**kwargs) -> Optional[str]:
    return _decline_float64(kwargs.get("student_logits"), kwargs.get("teacher_logits"))
