"""The rows a pass computes (KD rows, MLM rows) and their per-row coefficients."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from kdfast._reduction import kd_divisor, kd_factor, mlm_divisor


@dataclass
class Selection:
    """The rows a call computes and their per-row coefficients (all [R], R = selected rows)."""

    index: Optional[torch.Tensor]  # [R] int64 row ids, or None when every row is selected
    labels: torch.Tensor           # [R] int64, -1 = no MLM term
    kd_coef: torch.Tensor          # [R] fp32, d loss / d kd_row * (1/T), 0 for non-KD rows
    mlm_coef: torch.Tensor         # [R] fp32, d loss / d mlm_row
    kd_scale: torch.Tensor         # [R] fp64, kd = sum(kd_scale * kd_row)
    mlm_divisor: float

    @property
    def count(self) -> int:
        return self.labels.shape[0]

    def pick(self, x: torch.Tensor) -> torch.Tensor:
        """The selected rows of ``x`` [N, ...]."""
        return x if self.index is None else x.index_select(0, self.index)

    def parts(self, size: int) -> "Iterator[tuple[slice, Optional[torch.Tensor]]]":
        """Chunks of at most ``size`` selected rows: (their slice of the selection, their row ids [C] or None
        when every row is selected)."""
        for start in range(0, self.count, size):
            part = slice(start, min(start + size, self.count))
            yield part, None if self.index is None else self.index[part]


def rows_at(x: torch.Tensor, part: slice, ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The rows of ``x`` [N, ...] in a chunk from :meth:`Selection.parts`."""
    return x[part] if ids is None else x.index_select(0, ids)


def select_rows(rows: int, vocab: int, device: torch.device, labels: Optional[torch.Tensor], ignore_index: int,
                mask: Optional[torch.Tensor], row_weights: Optional[torch.Tensor], temperature: float,
                kd_weight: float, mlm_weight: float, reduction: str, t2_scale: bool) -> Selection:
    """KD rows: ``mask``, else labelled rows, else all (none when kd_weight is 0).
    MLM rows: labelled rows when mlm_weight is not 0. A call computes the union."""
    all_rows = torch.ones(rows, dtype=torch.bool, device=device)
    kd_rows = all_rows if mask is None and labels is None else (mask if mask is not None else labels != ignore_index)
    if kd_weight == 0:
        kd_rows = torch.zeros_like(all_rows)
    mlm_rows = (labels != ignore_index) if (mlm_weight != 0 and labels is not None) else torch.zeros_like(all_rows)
    chosen = kd_rows | mlm_rows
    index = None if bool(chosen.all()) else chosen.nonzero().squeeze(1)

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x if index is None else x.index_select(0, index)

    n_kd, n_mlm = int(kd_rows.sum()), int(mlm_rows.sum())
    kd_scale = pick(kd_rows).double() * (kd_factor(temperature, t2_scale) / kd_divisor(reduction, n_kd, vocab))
    if row_weights is not None:
        kd_scale = kd_scale * pick(row_weights).double()
    mlm_div = mlm_divisor(reduction, n_mlm)
    sel_mlm = pick(mlm_rows)
    if labels is not None:
        sel_labels = torch.where(sel_mlm, pick(labels), -1)
    else:
        sel_labels = torch.full_like(sel_mlm, -1, dtype=torch.long)
    return Selection(index=index, labels=sel_labels.long().contiguous(),
                     kd_coef=(kd_scale * (kd_weight / temperature)).float().contiguous(),
                     mlm_coef=(sel_mlm.double() * (mlm_weight / mlm_div)).float().contiguous(),
                     kd_scale=kd_scale, mlm_divisor=mlm_div)
