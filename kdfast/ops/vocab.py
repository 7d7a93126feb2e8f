"""Vocabulary KD as custom ops: ``kdfast::fused_linear_kd`` (both LM heads, chunked, gradients in
the forward), ``kdfast::fused_linear_kd_backward`` (its traced backward) and ``kdfast::kd_kl``
(given logits), on the row kernel of the backend named by ``backend`` (``kdfast/functions/vocab_kd/``).

``fused_linear_kd`` returns (kd, mlm, d_hidden, d_weight, d_bias): the two loss parts as 0-dim fp32
and the fp32 gradients of ``kd_weight * kd + mlm_weight * mlm`` for the inputs flagged in ``need``
([0] tensors for the others). Its autograd formula scales them by the incoming gradients; only when
``kd`` and ``mlm`` receive gradients in another ratio than their weights does it recompute the MLM
gradients (one more pass without the teacher).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from kdfast._reduction import kd_term
from kdfast.functions import vocab_kd as driver
from kdfast.functions.logit_map import LogitMap
from kdfast.functions.outputs import KDOutput
from kdfast.functions.sparse_targets import SparseTargets
from kdfast.ops._common import backend_module, no_grad_like, non_differentiable, tracing, wants_grad
from kdfast.ops._library import custom_op

OPS = ("kdfast::fused_linear_kd", "kdfast::fused_linear_kd_backward", "kdfast::kd_kl")


def _options(backend: str, labels, mask, row_weights, target_ids, target_weights, ignore_index: int,
             temperature: float, kind: str, reduction: str, t2_scale: bool, teacher_topk: Optional[int],
             beta: float, chunk_rows: Optional[int], student_softcap: Optional[float], student_logit_scale: float,
             teacher_softcap: Optional[float], teacher_logit_scale: float) -> driver.VocabKDOptions:
    """The chunked driver's options from the op's arguments (sparse targets prepared, their masses folded
    into row_weights; the KD term of ``kind`` at ``beta``; each head's logit map)."""
    targets = None if target_ids is None else SparseTargets.prepare(target_ids, target_weights)
    if targets is not None:
        row_weights = targets.mass if row_weights is None else targets.mass * row_weights.double()
    return driver.VocabKDOptions(
        row_kernel=backend_module("fused_linear_kd", backend).rows, labels=labels, ignore_index=ignore_index,
        temperature=temperature, kind=kd_term(kind, beta), reduction=reduction, t2_scale=t2_scale, mask=mask,
        row_weights=row_weights, teacher_topk=teacher_topk, beta=beta, teacher_targets=targets,
        chunk_rows=chunk_rows, student_map=LogitMap(student_softcap, student_logit_scale),
        teacher_map=LogitMap(teacher_softcap, teacher_logit_scale))


@custom_op("kdfast::fused_linear_kd", mutates_args=())
def _fused_linear_kd(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                     teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor],
                     teacher_bias: Optional[Tensor], labels: Optional[Tensor], mask: Optional[Tensor],
                     row_weights: Optional[Tensor], target_ids: Optional[Tensor], target_weights: Optional[Tensor],
                     backend: str, ignore_index: int, temperature: float, kd_weight: float, mlm_weight: float,
                     kind: str, reduction: str, t2_scale: bool, teacher_topk: Optional[int], beta: float,
                     chunk_rows: Optional[int], student_softcap: Optional[float], student_logit_scale: float,
                     teacher_softcap: Optional[float], teacher_logit_scale: float, need: Sequence[bool]
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    opts = _options(backend, labels, mask, row_weights, target_ids, target_weights, ignore_index, temperature,
                    kind, reduction, t2_scale, teacher_topk, beta, chunk_rows, student_softcap, student_logit_scale,
                    teacher_softcap, teacher_logit_scale)
    kd, mlm, *grads = driver.fused_pass(student_hidden, student_weight, student_bias, teacher_hidden,
                                        teacher_weight, teacher_bias, opts, tuple(need), kd_weight, mlm_weight)
    kd = (kd if kd_weight != 0 else kd * 0).float()
    mlm = (mlm if mlm_weight != 0 else mlm * 0).float()
    return kd, mlm, *(no_grad_like(student_hidden) if g is None else g for g in grads)


def _grad_shapes(student_hidden: Tensor, student_weight: Tensor, need: Sequence[bool]) -> list:
    shapes = (student_hidden.shape, student_weight.shape, student_weight.shape[:1])
    return [student_hidden.new_empty(shape if wanted else (0,), dtype=torch.float32)
            for shape, wanted in zip(shapes, need)]


@_fused_linear_kd.register_fake
def _(student_hidden, student_weight, *args):
    need = args[-1]
    scalar = student_hidden.new_empty((), dtype=torch.float32)
    return scalar, scalar.clone(), *_grad_shapes(student_hidden, student_weight, need)


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, _, _, _, labels, mask, row_weights, target_ids, target_weights, *options) = inputs
    _, _, d_hidden, d_weight, d_bias = output
    non_differentiable(ctx, d_hidden, d_weight, d_bias)
    ctx.save_for_backward(d_hidden, d_weight, d_bias, hidden, weight, bias, labels, mask, row_weights, target_ids,
                          target_weights)
    ctx.options = options
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)


def _scaled_grads(grad_kd: Tensor, grad_mlm: Tensor, stored: Sequence[Tensor], inputs: Sequence[Optional[Tensor]],
                  options: Sequence) -> list:
    """The input gradients given the gradients of kd and mlm (``driver.scale_stored_grads``); the MLM
    part's own gradients, when re-weighting needs them, come from one more pass without the teacher."""
    backend, ignore_index, temperature, kd_weight, mlm_weight, kind, reduction, t2_scale, topk, beta, chunk, *maps, \
        need = options

    def mlm_grads() -> list:
        hidden, weight, bias, labels, mask, row_weights, target_ids, target_weights = inputs
        opts = _options(backend, labels, mask, row_weights, target_ids, target_weights, ignore_index, temperature,
                        kind, reduction, t2_scale, topk, beta, chunk, *maps)
        return driver.fused_pass(hidden, weight, bias, None, None, None, opts, tuple(need), 0.0, 1.0)[2:]

    return driver.scale_stored_grads(grad_kd, grad_mlm, stored, kd_weight, mlm_weight, mlm_grads)


@custom_op("kdfast::fused_linear_kd_backward", mutates_args=())
def _fused_linear_kd_backward(grad_kd: Tensor, grad_mlm: Tensor, d_hidden: Tensor, d_weight: Tensor,
                              d_bias: Tensor, student_hidden: Tensor, student_weight: Tensor,
                              student_bias: Optional[Tensor], labels: Optional[Tensor], mask: Optional[Tensor],
                              row_weights: Optional[Tensor], target_ids: Optional[Tensor],
                              target_weights: Optional[Tensor], backend: str, ignore_index: int, temperature: float,
                              kd_weight: float, mlm_weight: float, kind: str, reduction: str, t2_scale: bool,
                              teacher_topk: Optional[int], beta: float, chunk_rows: Optional[int],
                              student_softcap: Optional[float], student_logit_scale: float,
                              teacher_softcap: Optional[float], teacher_logit_scale: float,
                              need: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    stored = (d_hidden, d_weight, d_bias)
    inputs = (student_hidden, student_weight, student_bias, labels, mask, row_weights, target_ids, target_weights)
    options = (backend, ignore_index, temperature, kd_weight, mlm_weight, kind, reduction, t2_scale, teacher_topk,
               beta, chunk_rows, student_softcap, student_logit_scale, teacher_softcap, teacher_logit_scale, need)
    grads = _scaled_grads(grad_kd, grad_mlm, [g if wanted else None for g, wanted in zip(stored, need)], inputs,
                          options)
    return tuple(no_grad_like(d_hidden) if g is None else g.clone() if g is s else g for g, s in zip(grads, stored))


@_fused_linear_kd_backward.register_fake
def _(grad_kd, grad_mlm, d_hidden, d_weight, d_bias, *args):
    return d_hidden.new_empty(d_hidden.shape), d_weight.new_empty(d_weight.shape), d_bias.new_empty(d_bias.shape)


def _backward(ctx, grad_kd, grad_mlm, *_):
    d_hidden, d_weight, d_bias, *inputs = ctx.saved_tensors
    grad_kd, grad_mlm = (torch.zeros((), dtype=torch.float32, device=d_hidden.device) if g is None else g  # no grad
                         for g in (grad_kd, grad_mlm))
    need = ctx.options[-1]
    if tracing(grad_kd, grad_mlm, d_hidden):
        grads = _fused_linear_kd_backward(grad_kd, grad_mlm, d_hidden, d_weight, d_bias, *inputs, *ctx.options)
    else:
        grads = _scaled_grads(grad_kd, grad_mlm, [g if wanted else None for g, wanted in
                                                   zip((d_hidden, d_weight, d_bias), need)], inputs, ctx.options)
    out = [g.to(dtype) if wanted and g is not None else None for g, dtype, wanted in zip(grads, ctx.dtypes, need)]
    return (*out, *([None] * 24))


_fused_linear_kd.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_kd(backend: str, *, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                    student_bias=None, teacher_bias=None, labels=None, ignore_index=-100, temperature=1.0,
                    kd_weight=1.0, mlm_weight=0.0, kind="kl", reduction="batchmean", t2_scale=True, mask=None,
                    row_weights=None, teacher_topk=None, teacher_targets=None, beta=0.5, student_softcap=None,
                    student_logit_scale=1.0, teacher_softcap=None, teacher_logit_scale=1.0,
                    chunk_rows: Optional[int] = None) -> KDOutput:
    """``kdfast.fused_linear_kd`` (validated keyword arguments) through ``kdfast::fused_linear_kd`` on
    ``backend``; ``chunk_rows`` forces the rows per chunk. ``teacher_targets`` (ids [N, K], weights
    [N, K]) replace the teacher head (``kdfast/functions/sparse_targets.py``)."""
    target_ids, target_weights = (None, None) if teacher_targets is None else teacher_targets
    need = [wants_grad(student_hidden), wants_grad(student_weight), wants_grad(student_bias)]
    detached = (None if x is None else x.detach() for x in (teacher_hidden, teacher_weight, teacher_bias))
    kd, mlm, *_ = _fused_linear_kd(
        student_hidden, student_weight, student_bias, *detached, labels, mask, row_weights, target_ids,
        target_weights, backend, ignore_index, float(temperature), float(kd_weight), float(mlm_weight), kind,
        reduction, bool(t2_scale), teacher_topk, float(beta), chunk_rows,
        None if student_softcap is None else float(student_softcap), float(student_logit_scale),
        None if teacher_softcap is None else float(teacher_softcap), float(teacher_logit_scale), need)
    return KDOutput(kd_weight * kd + mlm_weight * mlm, kd, mlm)


# --------------------------------------------------------------------------- KD on given logits


@custom_op("kdfast::kd_kl", mutates_args=())
def _kd_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor], backend: str, temperature: float,
           kind: str, reduction: str, t2_scale: bool, beta: float, chunk_rows: Optional[int],
           need_grad: bool) -> tuple[Tensor, Tensor]:
    opts = driver.VocabKDOptions(row_kernel=backend_module("kd_kl", backend).rows, temperature=temperature,
                                 kind=kd_term(kind, beta), beta=beta, reduction=reduction, t2_scale=t2_scale,
                                 mask=mask, chunk_rows=chunk_rows)
    loss, grad = driver.kd_kl_pass(student_logits, teacher_logits, opts, need_grad)
    return loss, no_grad_like(student_logits) if grad is None else grad


@_kd_kl.register_fake
def _(student_logits, teacher_logits, mask, backend, temperature, kind, reduction, t2_scale, beta, chunk_rows,
      need_grad):
    loss = student_logits.new_empty((), dtype=torch.float32)
    return loss, student_logits.new_empty(student_logits.shape if need_grad else (0,))


def _kd_kl_setup(ctx, inputs, output):
    non_differentiable(ctx, output[1])
    ctx.save_for_backward(output[1])
    ctx.need_grad = inputs[-1]


def _kd_kl_backward(ctx, grad_output, _):
    (grad,) = ctx.saved_tensors
    return (grad * grad_output.to(grad.dtype) if ctx.need_grad else None), *([None] * 10)


_kd_kl.register_autograd(_kd_kl_backward, setup_context=_kd_kl_setup)


def kd_kl(backend: str, *, student_logits, teacher_logits, temperature=1.0, mask=None, kind="kl",
          reduction="batchmean", t2_scale=True, beta=0.5, chunk_rows: Optional[int] = None) -> Tensor:
    """``kdfast.kd_kl`` (validated keyword arguments) through ``kdfast::kd_kl`` on ``backend``: a 0-dim fp32 loss."""
    loss, _ = _kd_kl(student_logits, teacher_logits.detach(), mask, backend, float(temperature), kind, reduction,
                     bool(t2_scale), float(beta), chunk_rows, wants_grad(student_logits))
    return loss
