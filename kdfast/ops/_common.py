"""Helpers shared by the op modules: the backend module behind a ``backend`` argument, empty
stand-ins for gradients not asked for, outputs without gradients, and whether a call is being traced."""
from __future__ import annotations

from types import ModuleType
from typing import Optional

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
