"""Op ``relation_kl`` on the ``cuda`` backend: the CUDA kernels in ``kdfast._cuda``."""
from __future__ import annotations

from typing import Optional

import torch

from kdfast.cuda.attention_kl import KERNELS
from kdfast.functions import attention_kl as native


def relation_kl(x_s: torch.Tensor, x_t: torch.Tensor, num_relation_heads: int,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    return native.relation_kl(KERNELS, x_s, x_t, num_relation_heads, key_mask)


unsupported_reason = native.relation_kl_unsupported
