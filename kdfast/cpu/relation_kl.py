"""Op ``relation_kl`` on the ``cpu`` backend: the C++/OpenMP kernel in ``kdfast._C``."""
from __future__ import annotations

from typing import Optional

import torch

from kdfast.cpu.attention_kl import KERNELS
from kdfast.functions import attention_kl as native
from kdfast.ops import attention


def relation_kl(x_s: torch.Tensor, x_t: torch.Tensor, num_relation_heads: int,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    return attention.relation_kl("cpu", x_s, x_t, num_relation_heads, key_mask)


def forward(x_s, x_t, num_relation_heads, key_mask):
    return native.relation_forward(KERNELS, x_s, x_t, num_relation_heads, key_mask)


def backward(grad_loss, x_s, x_t, num_relation_heads, key_mask, lse_s, lse_t, rows):
    return native.relation_backward(KERNELS, grad_loss, x_s, x_t, num_relation_heads, key_mask, lse_s, lse_t, rows)


unsupported_reason = native.relation_kl_unsupported
