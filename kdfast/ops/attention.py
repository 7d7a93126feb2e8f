"""Attention losses as custom ops on the backend named by ``backend``:

- ``kdfast::attention_kl`` (MiniLM) and ``kdfast::relation_kl`` (MiniLMv2) return (loss, lse_s,
  lse_t [B, h, L] fp32, row count 0-dim fp32); their ``*_backward`` ops recompute the score tiles
  from the two log-sum-exps (``kdfast/functions/attention_kl.py``, ``kdfast/triton/attention_kl.py``);
- ``kdfast::attention_score_mse`` (TinyBERT) returns (loss, d q_s, d k_s), the gradients flagged in
  ``need`` ([0] tensors for the others), which its backward scales.

The autograd formulas live here, at the loss level: the kernel ops they reach through the backends
(``kdfast::attention_kl_rows`` + ``_backward``, ``attention_mse_gram`` and their ``_triton`` twins) are
forward and backward pieces without formulas of their own.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from kdfast.functions.attention_score_mse import attention_score_mse_pass
from kdfast.ops._common import backend_module, no_grad_like, non_differentiable, scale_stored, wants_grad
from kdfast.ops._library import custom_op

OPS = ("kdfast::attention_kl", "kdfast::attention_kl_backward", "kdfast::relation_kl",
       "kdfast::relation_kl_backward", "kdfast::attention_score_mse")


def _stats_like(x: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fake (loss, lse_s, lse_t, rows) for [B, heads, L] rows of ``x``."""
    scalar = x.new_empty((), dtype=torch.float32)
    lse = x.new_empty((x.shape[0], heads, x.shape[-2]), dtype=torch.float32)
    return scalar, lse, lse.clone(), scalar.clone()


# --------------------------------------------------------------------------- attention KL (MiniLM)


@custom_op("kdfast::attention_kl", mutates_args=())
def _attention_kl(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, key_mask: Optional[Tensor],
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backend_module("attention_kl", backend).forward(q_s, k_s, q_t, k_t, key_mask)


@_attention_kl.register_fake
def _(q_s, k_s, q_t, k_t, key_mask, backend):
    return _stats_like(q_s, q_s.shape[1])


@custom_op("kdfast::attention_kl_backward", mutates_args=())
def _attention_kl_backward(grad_loss: Tensor, q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor,
                           key_mask: Optional[Tensor], lse_s: Tensor, lse_t: Tensor, rows: Tensor,
                           backend: str) -> tuple[Tensor, Tensor]:
    return backend_module("attention_kl", backend).backward(grad_loss, q_s, k_s, q_t, k_t, key_mask, lse_s, lse_t,
                                                            rows)


@_attention_kl_backward.register_fake
def _(grad_loss, q_s, k_s, *args):
    return q_s.new_empty(q_s.shape), k_s.new_empty(k_s.shape)


def _attention_kl_setup(ctx, inputs, output):
    q_s, k_s, q_t, k_t, key_mask, ctx.backend = inputs
    non_differentiable(ctx, *output[1:])
    ctx.save_for_backward(q_s, k_s, q_t, k_t, key_mask, *output[1:])


def _attention_kl_grads(ctx, grad_loss, *_):
    dq, dk = _attention_kl_backward(grad_loss, *ctx.saved_tensors, ctx.backend)
    return dq, dk, None, None, None, None


_attention_kl.register_autograd(_attention_kl_grads, setup_context=_attention_kl_setup)


def attention_kl(backend: str, q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor,
                 key_mask: Optional[Tensor]) -> Tensor:
    """``kdfast.attention_kl`` (validated arguments) through ``kdfast::attention_kl`` on ``backend``."""
    loss, *_ = _attention_kl(q_s, k_s, q_t.detach(), k_t.detach(), key_mask, backend)
    return loss


# --------------------------------------------------------------------------- relation KL (MiniLMv2)


@custom_op("kdfast::relation_kl", mutates_args=())
def _relation_kl(x_s: Tensor, x_t: Tensor, num_relation_heads: int, key_mask: Optional[Tensor],
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backend_module("relation_kl", backend).forward(x_s, x_t, num_relation_heads, key_mask)


@_relation_kl.register_fake
def _(x_s, x_t, num_relation_heads, key_mask, backend):
    return _stats_like(x_s, num_relation_heads)


@custom_op("kdfast::relation_kl_backward", mutates_args=())
def _relation_kl_backward(grad_loss: Tensor, x_s: Tensor, x_t: Tensor, num_relation_heads: int,
                          key_mask: Optional[Tensor], lse_s: Tensor, lse_t: Tensor, rows: Tensor,
                          backend: str) -> Tensor:
    return backend_module("relation_kl", backend).backward(grad_loss, x_s, x_t, num_relation_heads, key_mask, lse_s,
                                                           lse_t, rows)


@_relation_kl_backward.register_fake
def _(grad_loss, x_s, *args):
    return x_s.new_empty(x_s.shape)


def _relation_kl_setup(ctx, inputs, output):
    x_s, x_t, ctx.heads, key_mask, ctx.backend = inputs
    non_differentiable(ctx, *output[1:])
    ctx.save_for_backward(x_s, x_t, key_mask, *output[1:])


def _relation_kl_grads(ctx, grad_loss, *_):
    x_s, x_t, key_mask, lse_s, lse_t, rows = ctx.saved_tensors
    dx = _relation_kl_backward(grad_loss, x_s, x_t, ctx.heads, key_mask, lse_s, lse_t, rows, ctx.backend)
    return dx, None, None, None, None


_relation_kl.register_autograd(_relation_kl_grads, setup_context=_relation_kl_setup)


def relation_kl(backend: str, x_s: Tensor, x_t: Tensor, num_relation_heads: int, key_mask: Optional[Tensor]) -> Tensor:
    """``kdfast.relation_kl`` (validated arguments) through ``kdfast::relation_kl`` on ``backend``."""
    loss, *_ = _relation_kl(x_s, x_t.detach(), num_relation_heads, key_mask, backend)
    return loss


# --------------------------------------------------------------------------- attention-score MSE (TinyBERT)


@custom_op("kdfast::attention_score_mse", mutates_args=())
def _attention_score_mse(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, key_mask: Optional[Tensor],
                         include_masked_keys: bool, backend: str,
                         need: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    kernel = backend_module("attention_score_mse", backend).kernel
    loss, grads = attention_score_mse_pass(kernel, q_s, k_s, q_t, k_t, key_mask, include_masked_keys, tuple(need))
    return loss, *(no_grad_like(q_s) if g is None else g for g in grads)


@_attention_score_mse.register_fake
def _(q_s, k_s, q_t, k_t, key_mask, include_masked_keys, backend, need):
    return (q_s.new_empty((), dtype=torch.float32),
            *(x.new_empty(x.shape) if wanted else x.new_empty((0,), dtype=torch.float32)
              for x, wanted in zip((q_s, k_s), need)))


def _score_mse_setup(ctx, inputs, output):
    non_differentiable(ctx, *output[1:])
    ctx.save_for_backward(*output[1:])
    ctx.need = inputs[-1]


def _score_mse_grads(ctx, grad_loss, *_):
    dq, dk = scale_stored(ctx.saved_tensors, ctx.need, grad_loss)
    return dq, dk, None, None, None, None, None, None


_attention_score_mse.register_autograd(_score_mse_grads, setup_context=_score_mse_setup)


def attention_score_mse(backend: str, q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor,
                        key_mask: Optional[Tensor], include_masked_keys: bool) -> Tensor:
    """``kdfast.attention_score_mse`` (validated arguments) through ``kdfast::attention_score_mse``."""
    need = [wants_grad(q_s), wants_grad(k_s)]
    loss, *_ = _attention_score_mse(q_s, k_s, q_t.detach(), k_t.detach(), key_mask, include_masked_keys, backend,
                                    need)
    return loss
