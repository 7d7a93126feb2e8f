"""Pieces shared by the bench op modules: which kernel backends run here, the standard impl table
(``kdfast:<backend>``, ``eager``, ``compile``, ``floor``) and a per-batch-row float64 reference."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from kdfast import _backends

KERNEL_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}

Impl = Callable[[dict], tuple]

_compiled: dict[Callable, Callable] = {}


def loss_and_grads(*leaves: str) -> Callable[[torch.Tensor, dict], tuple]:
    """``grads(loss, x) -> (loss.detach(), *d loss / d x[leaf] for each leaf)``."""
    def grads(loss: torch.Tensor, x: dict) -> tuple:
        return (loss.detach(), *torch.autograd.grad(loss, tuple(x[name] for name in leaves)))
    return grads


def qk_score_floor(x: dict) -> tuple:
    """The floor of the Q/K score ops: the student and teacher [B, h, L, L] score matmuls, no grad."""
    with torch.no_grad():
        return (torch.matmul(x["q_s"], x["k_s"].transpose(-1, -2)), torch.matmul(x["q_t"], x["k_t"].transpose(-1, -2)))


def available_kernel_backends(op: str, device: torch.device) -> list[str]:
    """The kernel backends of ``op`` that can run on ``device`` here."""
    return [b for b in KERNEL_BACKENDS.get(device.type, ())
            if _backends.backend_ready(b, device) is None and _backends.implemented(op, b)]


def standard_impls(op: str, device: torch.device, kdfast_impl: Callable[[str], Impl],
                   eager_loss: Callable[..., torch.Tensor], grads: Callable[[torch.Tensor, dict], tuple],
                   floor: Impl) -> dict[str, Impl]:
    """``kdfast:<backend>`` per available kernel backend, ``eager`` (``grads(eager_loss(**x), x)``),
    ``compile`` (the same through ``torch.compile``, compiled once per process) and ``floor``."""
    def eager(x: dict) -> tuple:
        return grads(eager_loss(**x), x)

    def compiled(x: dict) -> tuple:
        fn = _compiled.setdefault(eager_loss, torch.compile(eager_loss, dynamic=False))
        return grads(fn(**x), x)

    found = {f"kdfast:{b}": kdfast_impl(b) for b in available_kernel_backends(op, device)}
    return {**found, "eager": eager, "compile": compiled, "floor": floor}


def per_row_reference(x: dict, leaves: Sequence[str], row_loss: Callable[[dict], torch.Tensor]) -> tuple:
    """(loss, *grads of ``leaves``) in float64, one batch row at a time (so a float64 [h, L, L] at most),
    each row's ``row_loss`` rescaled to the mean over the full batch. ``row_loss`` gets ``x`` sliced to one
    row, floating tensors in float64, the leaves requiring grad."""
    batch = x[leaves[0]].shape[0]
    loss, grads = 0.0, tuple([] for _ in leaves)
    for b in range(batch):
        row = {name: _row_float64(value, b) for name, value in x.items()}
        leaf_rows = [row[name].requires_grad_() for name in leaves]
        part = row_loss(row) / batch
        for store, grad in zip(grads, torch.autograd.grad(part, leaf_rows)):
            store.append(grad)
        loss += part.item()
    return (torch.tensor(loss, dtype=torch.float64), *(torch.cat(g) for g in grads))


def _row_float64(value, b: int):
    if not isinstance(value, torch.Tensor):
        return value
    row = value[b:b + 1].detach()
    return row.double() if row.is_floating_point() else row
