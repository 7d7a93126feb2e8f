"""Hidden-state MSE (TinyBERT), with an optional learnable projection of the student."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdfast import _backends
from kdfast import _checks as check


def hidden_mse(h_s: torch.Tensor, h_t: torch.Tensor, proj: Optional[nn.Linear] = None,
               mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """MSE of ``proj(h_s)`` [B, L, Ht] against ``h_t`` [B, L, Ht] (``proj`` maps Hs -> Ht; without it
    Hs must equal Ht). ``mask`` [B, L] keeps tokens (True); the mean runs over kept tokens x Ht.
    The teacher is a constant; ``proj``'s weight and bias get gradients.
    """
    check.choice("backend", backend, ("auto",) + _backends.BACKENDS)
    check.tensor("h_s", h_s, ndim=3)
    check.tensor("h_t", h_t, ndim=3)
    b, length, width_s = h_s.shape
    weight = bias = None
    if proj is not None:
        if not isinstance(proj, nn.Linear):
            raise TypeError(f"proj: expected None or torch.nn.Linear, got {type(proj).__name__}")
        weight, bias = proj.weight, proj.bias
        check.shape("proj.weight", weight, (h_t.shape[2], width_s), "[Ht, Hs] mapping h_s to h_t")
    check.shape("h_t", h_t, (b, length, width_s if proj is None else None),
                "[B, L, Hs] (no proj)" if proj is None else "[B, L, Ht]")
    device = check.same_device(("h_s", "h_t", "proj.weight"), (h_s, h_t, weight))
    mask = check.mask("mask", mask, (b, length), device, "[B, L]")
    check.finite("h_s", h_s)
    check.finite("h_t", h_t)
    return _backends.call("hidden_mse", device, backend, h_s=h_s, h_t=h_t, weight=weight, bias=bias, mask=mask)


class HiddenMSELoss(nn.Module):
    """Module form of :func:`hidden_mse`; owns the projection when widths differ."""

    def __init__(self, student_width: Optional[int] = None, teacher_width: Optional[int] = None,
                 backend: str = "auto"):
        super().__init__()
        needs_proj = student_width is not None and teacher_width is not None and student_width != teacher_width
        self.proj = nn.Linear(student_width, teacher_width) if needs_proj else None
        self.backend = backend

    def forward(self, h_s, h_t, mask=None) -> torch.Tensor:
        return hidden_mse(h_s, h_t, self.proj, mask, backend=self.backend)
