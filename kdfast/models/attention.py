"""The attention op of kdfast's model passes: flash-attn where installed on CUDA, else PyTorch SDPA.

Neither path materialises the [L, L] scores (SDPA picks its flash / memory-efficient kernels on
CUDA and its flash kernel on CPU). Padding: flash-attn runs its varlen kernel on the unpadded
tokens; SDPA gets a [B, 1, 1, L] key mask. One exception, warned once: attention dropout on CPU,
which SDPA only implements in its math kernel ([L, L] probabilities); set the model's
``attention_probs_dropout_prob=0`` to keep CPU steps free of [L, L] tensors.
"""
from __future__ import annotations

import importlib.util
import warnings
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F


@lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    """flash-attn (Dao-AILab) installed and CUDA present (optional: ``pip install kdfast[flash]``)."""
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def _use_flash_attn(q: torch.Tensor) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and flash_attn_available())


def _flash_attn(q, k, v, key_mask, dropout_p):
    """flash-attn on [B, h, L, d] views; varlen on the unpadded tokens when ``key_mask`` is given."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, L, h, d], last dim contiguous
    if key_mask is None:
        return flash_attn_func(q, k, v, dropout_p=dropout_p).transpose(1, 2)
    b, length, h, d = q.shape
    keep = key_mask.reshape(-1).nonzero().squeeze(1)
    lengths = key_mask.sum(1, dtype=torch.int32)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    longest = int(lengths.max())
    packed = [x.reshape(b * length, h, d).index_select(0, keep) for x in (q, k, v)]
    out = flash_attn_varlen_func(*packed, cu, cu, longest, longest, dropout_p=dropout_p)
    full = out.new_zeros(b * length, h, d).index_copy(0, keep, out)
    return full.reshape(b, length, h, d).transpose(1, 2)


_warned: set = set()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
           dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for [B, h, L, d] inputs; ``key_mask`` [B, L] bool (True =
    real token) or None. Returns [B, h, L, d]."""
    if _use_flash_attn(q):
        return _flash_attn(q, k, v, key_mask, dropout_p)
    if dropout_p > 0 and q.device.type == "cpu" and "cpu-dropout" not in _warned:
        _warned.add("cpu-dropout")
        warnings.warn("kdfast: attention dropout on CPU runs SDPA's math kernel, which materialises [L, L] "
                      "probabilities; set attention_probs_dropout_prob=0 in the model config to avoid it",
                      stacklevel=2)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
