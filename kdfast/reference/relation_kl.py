"""Reference MiniLMv2 self-attention relation KL."""
from __future__ import annotations

from typing import Optional

import torch

from kdfast.reference.attention_kl import attention_kl


def split_relation_heads(x: torch.Tensor, num_relation_heads: int) -> torch.Tensor:
    """[B, L, H] -> [B, A_r, L, H / A_r]."""
    b, length, width = x.shape
    return x.reshape(b, length, num_relation_heads, width // num_relation_heads).transpose(1, 2)


def relation_kl(x_s: torch.Tensor, x_t: torch.Tensor, num_relation_heads: int,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    xs = split_relation_heads(x_s, num_relation_heads)
    xt = split_relation_heads(x_t, num_relation_heads)
    return attention_kl(xs, xs, xt, xt, key_mask)
