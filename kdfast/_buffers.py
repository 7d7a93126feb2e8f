"""Output buffers for kernels, and the CPU scratch workspace kept between calls. With KDFAST_POISON=1 (the
tests set it) every buffer a kernel is meant to overwrite starts as NaN, so a kernel that skips an element
fails loudly."""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

import torch


def poisoning() -> bool:
    return os.environ.get("KDFAST_POISON", "0") == "1"


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` that is NaN-filled (or -1 for integer types) when poisoning is on."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poisoning():
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def new_output_like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`new_output` of ``x``'s shape in ``dtype`` with ``x``'s strides where ``x`` is dense (a head
    view [B, h, L, d] of a [B, L, H] buffer gets one too), contiguous otherwise (``torch.empty_like``)."""
    out = torch.empty_like(x, dtype=dtype)
    if poisoning():
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


_SPARE: "dict[torch.device, torch.Tensor]" = {}  # per CPU device: the largest workspace given back, free
_SPARE_LOCK = threading.Lock()


@contextlib.contextmanager
def workspace(numel: int, device: torch.device) -> Iterator[torch.Tensor]:
    """A flat fp32 scratch tensor of at least ``numel`` elements, for the block only (its contents are
    undefined). On CPU the tensor is kept for the next call: a fresh one of ~100 MiB comes from mmap, and
    its first writes fault in and zero every 4 KiB page (18 ms per 66 MiB on a 2-core VM), a pass over
    memory per call that a training loop need not pay. The largest one is kept (``release_workspaces``
    frees it). Elsewhere it is ``torch.empty``: CUDA's caching allocator already reuses memory. Concurrent
    callers each get their own."""
    device = torch.device(device)
    if device.type != "cpu":
        yield torch.empty(numel, dtype=torch.float32, device=device)
        return
    with _SPARE_LOCK:
        spare = _SPARE.pop(device, None)
    if spare is None or spare.numel() < numel:
        spare = torch.empty(numel, dtype=torch.float32, device=device)
    try:
        yield spare[:numel]
    finally:
        with _SPARE_LOCK:
            kept = _SPARE.get(device)
            if kept is None or kept.numel() < spare.numel():
                _SPARE[device] = spare


def release_workspaces() -> None:
    """Free the CPU workspaces kept between calls (``workspace``)."""
    with _SPARE_LOCK:
        _SPARE.clear()
