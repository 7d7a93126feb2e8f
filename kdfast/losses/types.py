"""Result types of the public losses."""
from __future__ import annotations

from typing import NamedTuple

import torch


class KDOutput(NamedTuple):
    """``loss = kd_weight * kd + mlm_weight * mlm``; all three are 0-dim float32/float64 tensors."""

    loss: torch.Tensor
    kd: torch.Tensor
    mlm: torch.Tensor
