"""The fused pass of op ``fused_linear_kd``: loss sums and fp32 student gradients, chunk by chunk."""
from __future__ import annotations

from typing import Optional

import torch

from kdfast._buffers import workspace
from kdfast.functions.vocab_kd.chunking import chunk_rows, chunk_views
from kdfast.functions.vocab_kd.gradients import add_chunk_grads, pass_buffers
from kdfast.functions.vocab_kd.head import Head
from kdfast.functions.vocab_kd.options import VocabKDOptions
from kdfast.functions.vocab_kd.phases import current_hook
from kdfast.functions.vocab_kd.selection import rows_at, select_rows
from kdfast.functions.vocab_kd.teacher import TeacherLogits


def fused_pass(student_hidden: torch.Tensor, student_weight: torch.Tensor, student_bias: Optional[torch.Tensor],
               teacher_hidden: Optional[torch.Tensor], teacher_weight: Optional[torch.Tensor],
               teacher_bias: Optional[torch.Tensor], opts: VocabKDOptions, need: "tuple[bool, bool, bool]",
               kd_weight: float, mlm_weight: float) -> tuple:
    """Loss sums and fp32 gradients of ``kd_weight * kd + mlm_weight * mlm``, chunk by chunk.

    Returns (kd [0-dim fp64], mlm [0-dim fp64], d_hidden [N, Hs], d_weight [V, Hs], d_bias [V]); a gradient
    is None when ``need`` says it is not wanted. A zero ``kd_weight`` skips the teacher. With sparse targets
    (``opts.teacher_targets``, whose masses S are already in ``opts.row_weights``) the teacher chunk is
    filled from them instead of a teacher head."""
    vocab, device = student_weight.shape[0], student_hidden.device
    sel = select_rows(student_hidden.shape[0], vocab, device, opts.labels, opts.ignore_index, opts.mask,
                      opts.row_weights, opts.temperature, kd_weight, mlm_weight, opts.reduction, opts.t2_scale)
    d_hidden, d_weight, d_bias, kd_sum, mlm_sum = pass_buffers(student_hidden, student_weight, need)
    if not sel.count:
        if d_weight is not None:
            d_weight.zero_()  # no chunk writes it
        return kd_sum, mlm_sum / sel.mlm_divisor, d_hidden, d_weight, d_bias
    student = Head(student_weight, student_bias)
    teacher = TeacherLogits(opts, teacher_hidden, teacher_weight, teacher_bias, with_kd=kd_weight != 0)
    slots = 3 if opts.student_map.needs_slope else 2  # the third: the capped student's dz/du
    size = opts.chunk_rows or chunk_rows(sel.count, vocab, device, slots)
    # Vocab-major chunks only for fp32 products (16-bit ones run on CUDA, where kernels are row-major).
    vocab_major = getattr(opts.row_kernel, "vocab_major", False) and not (student.native16 or teacher.native16)
    mark = current_hook()
    with workspace(slots * size * vocab, device) as flat:
        for part, ids in sel.parts(size):
            mark("start")
            s, t, slope = chunk_views(flat, slots, size, part.stop - part.start, vocab, vocab_major)
            x_s = rows_at(student_hidden, part, ids)
            student.logits_into(s, x_s)
            opts.student_map.apply_(s, slope)
            mark("student_logits")
            teacher.fill(t, s, part, ids)
            mark("teacher_logits")
            kd_row, mlm_row = opts.row_kernel(s, t, sel.labels[part], sel.kd_coef[part], sel.mlm_coef[part],
                                              opts.temperature, teacher.kind, opts.beta)
            kd_sum += (kd_row.double() * sel.kd_scale[part]).sum()
            mlm_sum += mlm_row.double().sum()
            mark("row_kernel")
            opts.student_map.backward_(s, slope)  # s: d loss / d student logits of the chunk; t is spent
            add_chunk_grads(student, s, t, x_s, part, ids, part.start == 0, d_hidden, d_weight, d_bias, mark)
    teacher.add_kl_offset_(kd_sum, sel)
    return kd_sum, mlm_sum / sel.mlm_divisor, d_hidden, d_weight, d_bias
