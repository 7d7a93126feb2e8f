"""Result types the autograd Functions and backends return (re-exported by ``kdfast.losses.types``)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class KDOutput(NamedTuple):
    """``loss = kd_weight * kd + mlm_weight * mlm``; all three are 0-dim float32/float64 tensors."""

    loss: torch.Tensor
    kd: torch.Tensor
    mlm: torch.Tensor
