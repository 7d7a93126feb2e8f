"""Softcapped and rescaled LM heads: the logits a model reports from its decoder output u = h·W + b.

``z = cap · tanh(u · scale / cap)`` (Gemma 2's ``final_logit_softcapping``: cap 30), or ``z = u · scale``
without a cap (Cohere's ``logit_scale`` multiplies; Granite's ``logits_scaling`` divides: scale =
1 / logits_scaling). Temperature, KD, cross-entropy and T² then act on z, as the model defines them.
The chunked driver (``kdfast/functions/vocab_kd/``) maps each fp32 logit chunk in place, so every row
kernel serves capped heads unchanged; the student's gradient then goes back through
dz/du = scale · (1 − (z/cap)²) = scale / cosh²(u · scale / cap), kept per chunk (the cosh form keeps its
relative accuracy where tanh rounds to ±1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class LogitMap:
    """``cap`` None (no tanh) or > 0; ``scale`` > 0 multiplies u before the cap."""

    cap: Optional[float] = None
    scale: float = 1.0

    @property
    def identity(self) -> bool:
        return self.cap is None and self.scale == 1.0

    @property
    def needs_slope(self) -> bool:
        """Whether the backward needs a per-element dz/du (a cap), not just the constant ``scale``."""
        return self.cap is not None

    def apply_(self, u: torch.Tensor, slope: Optional[torch.Tensor] = None) -> None:
        """u [C, V] fp32 (any strides) becomes z in place; ``slope`` (u's shape and strides) receives dz/du
        when given."""
        if self.cap is None:
            if self.scale != 1.0:
                u.mul_(self.scale)
            return
        u.mul_(self.scale / self.cap)
        if slope is not None:
            slope.copy_(u).cosh_().pow_(-2).mul_(self.scale)  # cosh overflows to inf past |y| = 89: slope 0
        u.tanh_().mul_(self.cap)

    def backward_(self, grad: torch.Tensor, slope: Optional[torch.Tensor]) -> None:
        """d loss / dz [C, V] becomes d loss / du in place (``slope`` from :meth:`apply_`)."""
        if slope is not None:
            grad.mul_(slope)
        elif self.scale != 1.0:
            grad.mul_(self.scale)
