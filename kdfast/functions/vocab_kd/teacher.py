"""The teacher side of a fused pass: what fills each chunk's teacher logits t [C, V] fp32."""
from __future__ import annotations

from typing import Optional

import torch

from kdfast.functions.vocab_kd.head import Head
from kdfast.functions.vocab_kd.options import VocabKDOptions
from kdfast.functions.vocab_kd.selection import Selection, rows_at


def keep_topk(t: torch.Tensor, k: int) -> None:
    """Set every teacher logit below the row's k-th largest to -inf (in place): p = 0 there."""
    if k < t.shape[1]:
        kth = torch.topk(t, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
        t.masked_fill_(t < kth, float("-inf"))


class TeacherLogits:
    """The teacher chunks of a pass: from sparse targets (``opts.teacher_targets``), else from the teacher
    head (its logit map, then ``opts.teacher_topk``); without a KD term (``with_kd`` False) a copy of the
    student's chunk, so KL(q || q) = 0 leaves only the MLM gradient."""

    def __init__(self, opts: VocabKDOptions, hidden: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], with_kd: bool):
        self.opts = opts
        self.targets = opts.teacher_targets if with_kd else None
        self.head = Head(weight, bias) if with_kd and self.targets is None else None
        self.hidden = hidden
        self.kind = opts.kind if with_kd else "kl"  # the row kernel's term: 0 on a copied chunk

    @property
    def native16(self) -> bool:
        return self.head is not None and self.head.native16

    def fill(self, t: torch.Tensor, s: torch.Tensor, part: slice, ids: Optional[torch.Tensor]) -> None:
        """Write the teacher logits of the chunk ``part`` (row ids ``ids``) into ``t``; ``s``: its student
        logits."""
        if self.targets is not None:
            self.targets.fill(t, part if ids is None else ids, self.opts.temperature)
        elif self.head is not None:
            self.head.logits_into(t, rows_at(self.hidden, part, ids))
            self.opts.teacher_map.apply_(t)
            if self.opts.teacher_topk is not None:
                keep_topk(t, self.opts.teacher_topk)
        else:
            t.copy_(s)

    def add_kl_offset_(self, kd_sum: torch.Tensor, sel: Selection) -> None:
        """KL on sparse targets: add the rows' S log S terms (``SparseTargets.kl_offset``) to ``kd_sum``."""
        if self.targets is not None and self.opts.kind == "kl":
            kd_sum += (sel.kd_scale * sel.pick(self.targets.kl_offset())).sum()
