"""Helpers shared by the op modules: the backend module behind a ``backend`` argument, empty
stand-ins for gradients not asked for, outputs without gradients, the scaling of stored gradients, and whether
a call is being traced."""
from __future__ import annotations

from types import ModuleType
from typing import Optional, Sequence

import torch

from kdfast import _backends

KERNEL_BACKENDS = ("cpu", "cuda", "triton")


def backend_module(op: str, backend: str) -> ModuleType:
    """``kdfast.<backend>.<op>`` for a kernel backend (the op's ``backend`` argument)."""
    module = _backends._module(op, backend) if backend in KERNEL_BACKENDS else None
    if module is None:
        raise ValueError(f"backend: expected one of {KERNEL_BACKENDS} implementing {op}, got {backend!r}")
    return module


def no_grad_like(x: torch.Tensor) -> torch.Tensor:
    """The [0] fp32 tensor an op returns in place of a gradient nobody asked for."""
    return x.new_empty((0,), dtype=torch.float32)


def non_differentiable(ctx, *outputs: torch.Tensor) -> None:
    """Mark an op's extra outputs (stored gradients, statistics) non-differentiable, and have autograd pass
    None, not a zero-filled tensor, for any output without a gradient (that fill costs a write of every
    extra output per call); the backward formulas read only the losses' gradients."""
    ctx.mark_non_differentiable(*outputs)
    ctx.set_materialize_grads(False)


def scale_stored(stored: Sequence[torch.Tensor], need: Sequence[bool], grad_loss: torch.Tensor) -> list:
    """A grad-in-forward op's input gradients: its stored gradients times the loss's incoming gradient, None
    where ``need`` is False. Eager on CPU at exactly 1 (a plain ``loss.backward()``) they are the stored
    tensors themselves, as in the vocabulary op: reading the scale costs nothing there and spares a write of
    every gradient. On a GPU that read would be a sync, and traced code must not branch on it."""
    if grad_loss.device.type == "cpu" and not tracing(grad_loss) and bool(grad_loss == 1):
        return [g if wanted else None for g, wanted in zip(stored, need)]
    return [g * grad_loss if wanted else None for g, wanted in zip(stored, need)]


def wants_grad(x: Optional[torch.Tensor]) -> bool:
    return x is not None and torch.is_grad_enabled() and x.requires_grad


def tracing(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether this runs under torch.compile / export / make_fx (fake or functional tensors), where
    a formula must not branch on tensor values."""
    if torch.compiler.is_compiling():
        return True
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None:
        return True
    return any(t is not None and type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors)
