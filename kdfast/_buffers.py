"""Output buffers for kernels. With KDFAST_POISON=1 (the tests set it) every buffer a
kernel is meant to overwrite starts as NaN, so a kernel that skips an element fails loudly."""
from __future__ import annotations

import os

import torch


def poisoning() -> bool:
    return os.environ.get("KDFAST_POISON", "0") == "1"


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` that is NaN-filled (or -1 for integer types) when poisoning is on."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poisoning():
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out
