"""kd_kl on the cuda backend: the CUDA extension (a block per row) vocabulary-KD row kernel on given logits."""
from __future__ import annotations

import torch

from kdfast.cuda.fused_linear_kd import rows  # noqa: F401  (the row kernel of op kd_kl)
from kdfast.functions.vocab_kd import kd_kl_unsupported_reason
from kdfast.ops import vocab


def kd_kl(**kwargs) -> torch.Tensor:
    """``kdfast.kd_kl`` on CUDA tensors (validated keyword arguments)."""
    return vocab.kd_kl("cuda", **kwargs)


unsupported_reason = kd_kl_unsupported_reason  # float64 goes to backend 'torch'
