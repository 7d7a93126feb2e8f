"""The pass of op ``kd_kl``: the row kernel on given [N, V] logits (no head products)."""
from __future__ import annotations

from typing import Optional

import torch

from kdfast._buffers import workspace
from kdfast.functions.vocab_kd.chunking import chunk_rows
from kdfast.functions.vocab_kd.options import VocabKDOptions
from kdfast.functions.vocab_kd.selection import rows_at, select_rows


def kd_kl_pass(student_logits: torch.Tensor, teacher_logits: torch.Tensor, opts: VocabKDOptions,
               need_grad: bool) -> "tuple[torch.Tensor, Optional[torch.Tensor]]":
    """``kdfast.kd_kl`` on ``opts.row_kernel`` (``opts.mask`` keeps rows; labels and row weights are not
    read): (0-dim fp32 loss, its gradient for the student logits in their dtype, or None without
    ``need_grad``)."""
    rows, vocab = student_logits.shape
    device = student_logits.device
    sel = select_rows(rows, vocab, device, None, -100, opts.mask, None, opts.temperature, 1.0, 0.0,
                      opts.reduction, opts.t2_scale)
    grad = torch.zeros(student_logits.shape, dtype=student_logits.dtype, device=device) if need_grad else None
    kd_sum = torch.zeros((), dtype=torch.float64, device=device)
    if not sel.count:
        return kd_sum.float(), grad
    size = opts.chunk_rows or chunk_rows(sel.count, vocab, device)
    # fp32 without a mask: the kernel works directly in the gradient buffer.
    in_place = grad is not None and sel.index is None and grad.dtype == torch.float32
    with workspace((1 if in_place else 2) * size * vocab, device) as chunks:
        t_buf = chunks[: size * vocab].view(size, vocab)
        s_buf = None if in_place else chunks[size * vocab:].view(size, vocab)
        for part, ids in sel.parts(size):
            s = grad[part] if in_place else s_buf[: part.stop - part.start]
            t = t_buf[: part.stop - part.start]
            s.copy_(rows_at(student_logits, part, ids))
            t.copy_(rows_at(teacher_logits, part, ids))
            kd_row, _ = opts.row_kernel(s, t, sel.labels[part], sel.kd_coef[part], sel.mlm_coef[part],
                                        opts.temperature, opts.kind, opts.beta)
            kd_sum += (kd_row.double() * sel.kd_scale[part]).sum()
            if grad is not None and not in_place:
                if ids is None:
                    grad[part] = s
                else:
                    grad.index_copy_(0, ids, s.to(grad.dtype))
    return kd_sum.float(), grad
