"""The options of one vocabulary-KD pass, built once per op call (``kdfast/ops/vocab.py``) from the op's
scalar arguments and read by the driver's passes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from kdfast.functions.logit_map import LogitMap
from kdfast.functions.sparse_targets import SparseTargets
from kdfast.functions.vocab_kd.row_kernels import RowKernel


@dataclass(frozen=True, eq=False)
class VocabKDOptions:
    """Everything a pass reads besides the heads and the loss weights (shapes: N rows)."""

    row_kernel: RowKernel                        # the backend's row kernel (contract in the package docstring)
    temperature: float = 1.0
    kind: str = "kl"                             # the KD term: kd_term(public kind, beta), a name of KINDS
    beta: float = 0.5                            # read by kind "jsd"
    reduction: str = "batchmean"
    t2_scale: bool = True
    labels: Optional[torch.Tensor] = None        # [N] int64, ignore_index = no MLM term
    ignore_index: int = -100
    mask: Optional[torch.Tensor] = None          # [N] bool, KD rows (else labelled rows, else all)
    row_weights: Optional[torch.Tensor] = None   # [N], sparse targets' masses S already folded in
    teacher_topk: Optional[int] = None           # keep the teacher's k largest logits
    teacher_targets: Optional[SparseTargets] = None  # replace the teacher head
    chunk_rows: Optional[int] = None             # forced rows per chunk (None: from the memory budget)
    student_map: LogitMap = field(default_factory=LogitMap)  # softcap / logit scale of each head
    teacher_map: LogitMap = field(default_factory=LogitMap)
