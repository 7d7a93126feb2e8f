"""kd_kl on the cpu backend: the C++/OpenMP vocabulary-KD row kernel on given logits."""
from __future__ import annotations

import torch

from kdfast.cpu.fused_linear_kd import rows  # noqa: F401  (the row kernel of op kd_kl)
from kdfast.functions.vocab_kd import kd_kl_unsupported_reason
from kdfast.ops import vocab


def kd_kl(**kwargs) -> torch.Tensor:
    """``kdfast.kd_kl`` on CPU tensors (validated keyword arguments)."""
    return vocab.kd_kl("cpu", **kwargs)


unsupported_reason = kd_kl_unsupported_reason  # float64 goes to backend 'torch'
