"""``attention_score_mse`` on the ``cuda`` backend: the driver (``kdfast/functions/attention_score_mse.py``) on the
kernel op ``kdfast::attention_mse_gram``, whose CUDA implementation runs the float64 Gram-algebra kernels of
``kdfast._cuda``."""
from __future__ import annotations

from typing import Optional

import torch

from kdfast.functions.attention_score_mse import decline
from kdfast.ops import attention, attention_kernels

MAX_HEAD_DIM = 128
kernel = attention_kernels.attention_mse_gram  # the driver's kernel contract (op kdfast::attention_mse_gram)


def unsupported_reason(q_s=None, q_t=None, **_) -> Optional[str]:
    return decline(q_s, q_t, "cuda", MAX_HEAD_DIM)


def attention_score_mse(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                        key_mask: Optional[torch.Tensor], include_masked_keys: bool) -> torch.Tensor:
    return attention.attention_score_mse("cuda", q_s, k_s, q_t, k_t, key_mask, include_masked_keys)
