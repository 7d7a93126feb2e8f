"""Op ``attention_kl`` on the ``cpu`` backend: the C++/OpenMP kernel in ``kdfast._C``."""
from __future__ import annotations

from typing import Optional

import torch

from kdfast import _ext
from kdfast.functions import attention_kl as native
from kdfast.ops import attention

KERNELS = native.Kernels(_ext.require_cpu)


def attention_kl(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                 key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    return attention.attention_kl("cpu", q_s, k_s, q_t, k_t, key_mask)


def forward(q_s, k_s, q_t, k_t, key_mask):
    return native.forward(KERNELS, q_s, k_s, q_t, k_t, key_mask)


def backward(grad_loss, q_s, k_s, q_t, k_t, key_mask, lse_s, lse_t, rows):
    return native.backward(KERNELS, grad_loss, q_s, k_s, q_t, k_t, key_mask, lse_s, lse_t, rows)


unsupported_reason = native.attention_kl_unsupported
