"""Attention distillation: MiniLM attention KL, MiniLMv2 relation KL, TinyBERT score MSE.

Shapes: B batch, h heads, L length, d head size (student d_s and teacher d_t may differ),
H hidden width, A_r relation heads. ``key_mask`` [B, L] is True for real tokens.
Kernel backends never hold an [L, L] tensor; the ``torch`` backend does (it is the reference).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdfast import _backends
from kdfast import _checks as check


def _check_qk(q_s, k_s, q_t, k_t, key_mask, backend) -> tuple[Optional[torch.Tensor], torch.device]:
    check.choice("backend", backend, ("auto",) + _backends.BACKENDS)
    for name, value in (("q_s", q_s), ("k_s", k_s), ("q_t", q_t), ("k_t", k_t)):
        check.tensor(name, value, ndim=4)
    b, h, length, _ = q_s.shape
    check.shape("k_s", k_s, tuple(q_s.shape), "[B, h, L, d_s] equal to q_s")
    check.shape("q_t", q_t, (b, h, length, None), "[B, h, L, d_t] with the B, h, L of q_s")
    check.shape("k_t", k_t, tuple(q_t.shape), "[B, h, L, d_t] equal to q_t")
    check.same_dtype(("q_s", "k_s"), (q_s, k_s))
    check.same_dtype(("q_t", "k_t"), (q_t, k_t))
    device = check.same_device(("q_s", "k_s", "q_t", "k_t"), (q_s, k_s, q_t, k_t))
    key_mask = check.mask("key_mask", key_mask, (b, length), device, "[B, L]")
    for name, value in (("q_s", q_s), ("k_s", k_s), ("q_t", q_t), ("k_t", k_t)):
        check.finite(name, value)
    return key_mask, device


def attention_kl(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                 key_mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """MiniLM attention-distribution loss from Q/K [B, h, L, d].

    Mean over (B, h, valid query rows) of KL(softmax(q_t k_t^T / sqrt(d_t)) || softmax(q_s k_s^T / sqrt(d_s))),
    masked keys excluded from both softmaxes and masked query rows excluded from the mean.
    """
    key_mask, device = _check_qk(q_s, k_s, q_t, k_t, key_mask, backend)
    return _backends.call("attention_kl", device, backend, q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t, key_mask=key_mask)


def relation_kl(x_s: torch.Tensor, x_t: torch.Tensor, num_relation_heads: int,
                key_mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """MiniLMv2 self-attention relation loss from x [B, L, H] (Q, K or V with heads concatenated).

    Each side splits H into A_r = ``num_relation_heads`` heads of d_r = H / A_r;
    R = softmax(x x^T / sqrt(d_r)) per head; the loss is the mean over (B, A_r, valid rows) of
    KL(R_t || R_s).
    """
    check.choice("backend", backend, ("auto",) + _backends.BACKENDS)
    check.tensor("x_s", x_s, ndim=3)
    check.tensor("x_t", x_t, ndim=3)
    b, length, width_s = x_s.shape
    check.shape("x_t", x_t, (b, length, None), "[B, L, Ht] with the B, L of x_s")
    check.divisible("x_s", width_s, num_relation_heads, "num_relation_heads")
    check.divisible("x_t", x_t.shape[2], num_relation_heads, "num_relation_heads")
    device = check.same_device(("x_s", "x_t"), (x_s, x_t))
    key_mask = check.mask("key_mask", key_mask, (b, length), device, "[B, L]")
    check.finite("x_s", x_s)
    check.finite("x_t", x_t)
    return _backends.call("relation_kl", device, backend, x_s=x_s, x_t=x_t,
                          num_relation_heads=num_relation_heads, key_mask=key_mask)


def attention_score_mse(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                        key_mask: Optional[torch.Tensor] = None, include_masked_keys: bool = False,
                        backend: str = "auto") -> torch.Tensor:
    """TinyBERT attention loss: mean over (B, h, L, L) of (q_s k_s^T/sqrt(d_s) - q_t k_t^T/sqrt(d_t))^2.

    Masked key columns count as 0 on both sides (TinyBERT's -10000 mask, then entries <= -100 set
    to 0); ``include_masked_keys=True`` keeps them (the study's embedding term).
    """
    key_mask, device = _check_qk(q_s, k_s, q_t, k_t, key_mask, backend)
    return _backends.call("attention_score_mse", device, backend, q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t,
                          key_mask=key_mask, include_masked_keys=bool(include_masked_keys))


class AttentionKLLoss(nn.Module):
    """Module form of :func:`attention_kl`."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, q_s, k_s, q_t, k_t, key_mask=None) -> torch.Tensor:
        return attention_kl(q_s, k_s, q_t, k_t, key_mask, backend=self.backend)


class RelationKLLoss(nn.Module):
    """Module form of :func:`relation_kl`; holds the number of relation heads."""

    def __init__(self, num_relation_heads: int, backend: str = "auto"):
        super().__init__()
        self.num_relation_heads = num_relation_heads
        self.backend = backend

    def forward(self, x_s, x_t, key_mask=None) -> torch.Tensor:
        return relation_kl(x_s, x_t, self.num_relation_heads, key_mask, backend=self.backend)


class AttentionScoreMSELoss(nn.Module):
    """Module form of :func:`attention_score_mse`."""

    def __init__(self, include_masked_keys: bool = False, backend: str = "auto"):
        super().__init__()
        self.include_masked_keys = include_masked_keys
        self.backend = backend

    def forward(self, q_s, k_s, q_t, k_t, key_mask=None) -> torch.Tensor:
        return attention_score_mse(q_s, k_s, q_t, k_t, key_mask, self.include_masked_keys, backend=self.backend)
