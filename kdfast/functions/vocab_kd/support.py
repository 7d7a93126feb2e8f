"""Inputs the kernel backends decline (``unsupported_reason`` of each backend module): float64, which the
torch reference serves."""
from __future__ import annotations

from typing import Optional

import torch


def unsupported_reason(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    """Kernel backends decline float64 (the torch reference serves it)."""
    for tensor in tensors:
        if tensor is not None and tensor.dtype == torch.float64:
            return "float64 inputs are served by backend='torch' (kernel backends compute in fp32)"
    return None


def fused_unsupported_reason(**kwargs) -> Optional[str]:
    """``unsupported_reason`` for the keyword arguments of ``fused_linear_kd``."""
    return unsupported_reason(kwargs.get("student_hidden"), kwargs.get("teacher_hidden"))


def kd_kl_unsupported_reason(**kwargs) -> Optional[str]:
    """``unsupported_reason`` for the keyword arguments of ``kd_kl``."""
    return unsupported_reason(kwargs.get("student_logits"), kwargs.get("teacher_logits"))
