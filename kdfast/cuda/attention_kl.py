"""Op ``attention_kl`` on the ``cuda`` backend: the native driver (``kdfast/functions/attention_kl.py``) on the
kernel ops ``kdfast::attention_kl_rows`` and ``kdfast::attention_kl_rows_backward``, whose CUDA implementations
run the CUDA kernels of ``kdfast._cuda``."""
from __future__ import annotations

import functools
from typing import Optional

import torch

from kdfast.functions import attention_kl as native
from kdfast.ops import attention, attention_kernels

forward = functools.partial(native.forward, attention_kernels)
backward = functools.partial(native.backward, attention_kernels)
unsupported_reason = native.attention_kl_unsupported


def attention_kl(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                 key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    return attention.attention_kl("cuda", q_s, k_s, q_t, k_t, key_mask)
