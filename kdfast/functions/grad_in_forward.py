"""One autograd Function for losses whose kernels return the input gradients with the loss.

``GradInForward.apply(compute, *inputs)`` calls ``compute(needs_grad, *inputs)``, which returns
``(loss, grads)`` with one entry per input (None where no gradient is wanted). The backward only
scales the stored gradients by ``grad_output``: no second read of the inputs, and two backward
passes are bitwise equal. Used by every kernel backend of ``attention_score_mse`` and ``hidden_mse``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

Compute = Callable[..., tuple[torch.Tensor, Sequence[Optional[torch.Tensor]]]]


class GradInForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, compute: Compute, *inputs):
        needs = tuple(isinstance(x, torch.Tensor) and ctx.needs_input_grad[i + 1] for i, x in enumerate(inputs))
        loss, grads = compute(needs, *inputs)
        ctx.has_grad = tuple(g is not None for g in grads)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        stored = iter(ctx.saved_tensors)
        out = [None]
        for has in ctx.has_grad:
            out.append(next(stored) * grad_output if has else None)
        return tuple(out)
