"""Op ``relation_kl`` on the ``cuda`` backend: the native driver (``kdfast/functions/attention_kl.py``, k = q on
relation-head views) on the kernel ops ``kdfast::attention_kl_rows`` and ``kdfast::attention_kl_rows_backward``,
whose CUDA implementations run the CUDA kernels of ``kdfast._cuda``."""
from __future__ import annotations

import functools
from typing import Optional

import torch

from kdfast.functions import attention_kl as native
from kdfast.ops import attention, attention_kernels

forward = functools.partial(native.relation_forward, attention_kernels)
backward = functools.partial(native.relation_backward, attention_kernels)
unsupported_reason = native.relation_kl_unsupported


def relation_kl(x_s: torch.Tensor, x_t: torch.Tensor, num_relation_heads: int,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    return attention.relation_kl("cuda", x_s, x_t, num_relation_heads, key_mask)
