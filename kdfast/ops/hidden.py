"""Hidden-state MSE as the custom op ``kdfast::hidden_mse``: the projection and the fused row pass of
``kdfast/functions/hidden_mse.py`` on the row kernel of ``backend``, returning the loss and the
gradients it keeps (``need`` flags d h_s, d weight, d bias; [0] tensors for the others). Its autograd
formula scales them by the incoming gradient; the row-kernel ops it reaches (``kdfast::hidden_mse_rows``,
``hidden_mse_rows_triton``) have no formula of their own."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from kdfast.functions.hidden_mse import hidden_mse_pass
from kdfast.ops._common import backend_module, no_grad_like, non_differentiable, scale_stored, wants_grad
from kdfast.ops._library import custom_op

OPS = ("kdfast::hidden_mse",)


@custom_op("kdfast::hidden_mse", mutates_args=())
def _hidden_mse(h_s: Tensor, h_t: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mask: Optional[Tensor],
                backend: str, need: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    loss, grads = hidden_mse_pass(backend_module("hidden_mse", backend).rows, h_s, h_t, weight, bias, mask,
                                  tuple(need))
    return loss, *(no_grad_like(h_s) if g is None else g for g in grads)


@_hidden_mse.register_fake
def _(h_s, h_t, weight, bias, mask, backend, need):
    likes = (h_s, weight, bias)
    return (h_s.new_empty((), dtype=torch.float32),
            *(x.new_empty(x.shape) if wanted else h_s.new_empty((0,), dtype=torch.float32)
              for x, wanted in zip(likes, need)))


def _setup_context(ctx, inputs, output):
    non_differentiable(ctx, *output[1:])
    ctx.save_for_backward(*output[1:])
    ctx.need = inputs[-1]


def _backward(ctx, grad_loss, *_):
    grads = scale_stored(ctx.saved_tensors, ctx.need, grad_loss)
    return grads[0], None, grads[1], grads[2], None, None, None


_hidden_mse.register_autograd(_backward, setup_context=_setup_context)


def hidden_mse(backend: str, h_s: Tensor, h_t: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               mask: Optional[Tensor]) -> Tensor:
    """``kdfast.hidden_mse`` (validated arguments) through ``kdfast::hidden_mse`` on ``backend``; fp32 scalar."""
    need = [wants_grad(h_s), wants_grad(weight), wants_grad(bias)]
    loss, *_ = _hidden_mse(h_s, h_t.detach(), weight, bias, mask, backend, need)
    return loss
