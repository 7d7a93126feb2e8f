"""The student's gradients: the fused pass's accumulators, each chunk's contribution, and the scaling of
the stored gradients by the op's backward."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from kdfast.functions.vocab_kd.head import Head
from kdfast.functions.vocab_kd.phases import no_mark


def pass_buffers(hidden: torch.Tensor, weight: torch.Tensor, need: "tuple[bool, bool, bool]") -> tuple:
    """A fused pass's accumulators: fp32 d_hidden [N, H] (zeros), d_weight [V, H] (unwritten: the first
    chunk overwrites it), d_bias [V] (zeros), each None unless ``need`` (hidden, weight, bias) asks for it,
    and the 0-dim fp64 kd and mlm sums."""
    device = hidden.device
    d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=device) if need[0] else None
    d_weight = torch.empty(weight.shape, dtype=torch.float32, device=device) if need[1] else None
    d_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=device) if need[2] else None
    sums = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(2)]
    return d_hidden, d_weight, d_bias, *sums


def add_chunk_grads(student: Head, g: torch.Tensor, scratch: torch.Tensor, x: torch.Tensor, part: slice,
                    ids: Optional[torch.Tensor], first: bool, d_hidden: Optional[torch.Tensor],
                    d_weight: Optional[torch.Tensor], d_bias: Optional[torch.Tensor],
                    mark: Callable[[str], None] = no_mark) -> None:
    """Add a chunk's d loss / d logits ``g`` [C, V] fp32 (consumed; ``scratch``: a spent chunk of its
    size) into the student's gradients that are not None: d_bias [V], d_hidden [N, H] at rows ``part``
    of the selection (``ids`` [C] the row ids, None when every row is selected), d_weight [V, H] from the
    chunk's hidden states ``x`` [C, H] (``first`` overwrites it). ``mark``: the phase hook."""
    if d_bias is not None:
        d_bias += g.sum(0)
    operands = student.grad_operands(g, scratch=scratch) if d_hidden is not None or d_weight is not None else []
    if d_hidden is not None:
        if ids is None:
            student.times_weight(operands, out=d_hidden[part])
        else:
            d_hidden.index_copy_(0, ids, student.times_weight(operands, out=x.new_empty(x.shape, dtype=torch.float32)))
    mark("d_hidden")
    if d_weight is not None:
        student.add_weight_grad_(d_weight, operands, x, first=first)
    mark("d_weight")


def scale_stored_grads(grad_kd: torch.Tensor, grad_mlm: torch.Tensor, stored: "Sequence[Optional[torch.Tensor]]",
                       kd_weight: float, mlm_weight: float,
                       mlm_grads: "Callable[[], Sequence[Optional[torch.Tensor]]]") -> list:
    """Input gradients from the incoming gradients of ``kd`` and ``mlm``, given ``stored`` = the forward's
    gradients of ``kd_weight * kd + mlm_weight * mlm``. Only when the parts are re-weighted (another ratio
    than their weights) is ``mlm_grads()`` (the MLM part's own gradients, one more pass) called. At scale 1
    the stored tensors themselves are returned (one host read of the scale; no second [V, H] buffer)."""
    if not kd_weight and not mlm_weight:
        scale = grad_kd * 0
    elif not mlm_weight:
        scale = grad_kd / kd_weight
    elif not kd_weight or torch.equal(grad_kd * mlm_weight, grad_mlm * kd_weight):
        scale = grad_mlm / mlm_weight
    else:
        # stored = kd_weight*dkd + mlm_weight*dmlm, so grad_kd*dkd + grad_mlm*dmlm
        #        = (grad_kd/kd_weight)*stored + (grad_mlm - grad_kd*mlm_weight/kd_weight)*dmlm.
        first, second = grad_kd / kd_weight, grad_mlm - grad_kd * (mlm_weight / kd_weight)
        return [g if m is None or g is None else g * first + m * second for g, m in zip(stored, mlm_grads())]
    if bool(scale == 1):
        return list(stored)
    return [None if g is None else g * scale for g in stored]
