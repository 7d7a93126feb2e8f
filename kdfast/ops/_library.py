"""``custom_op``, ``triton_op`` and ``wrap_triton`` of ``torch.library`` where the installed torch has them
(``custom_op`` since 2.4, ``triton_op`` since 2.6), and stand-ins where it has not, so that kdfast runs on
every torch it supports (>= 2.3) with one registration code:

- without ``torch.library.custom_op``: :class:`EagerOp`, a callable with the same registration methods
  (``register_kernel``, ``register_fake``, ``register_autograd``). It runs the implementation for its inputs'
  device, through an ``autograd.Function`` when a formula is registered. It has no fake implementation,
  so ``torch.compile`` traces into it instead of seeing one node;
- without ``torch.library.triton_op``: a Triton launcher becomes a ``custom_op`` (opaque to the compiler)
  and ``wrap_triton`` returns the kernel itself.

Ops are called as the objects these return (``op(*args)``), never through ``torch.ops.kdfast``, which
the stand-ins do not fill.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

Devices = Union[str, Sequence[str], None]


class EagerOp:
    """A custom op on a torch without ``torch.library.custom_op``: ``fn`` runs for ``device_types`` (all
    devices when None), other devices' implementations come from :meth:`register_kernel`."""

    def __init__(self, name: str, fn: Callable, device_types: Devices):
        self.name = name
        self._default = fn if device_types is None else None
        devices = () if device_types is None else (device_types,) if isinstance(device_types, str) else device_types
        self._kernels = {device: fn for device in devices}
        self._function: Optional[type] = None

    def register_kernel(self, device_type: str, fn: Optional[Callable] = None):
        def register(kernel: Callable) -> Callable:
            self._kernels[device_type] = kernel
            return kernel
        return register if fn is None else register(fn)

    def register_fake(self, fn: Callable) -> Callable:
        return fn  # nothing traces an EagerOp with fake tensors

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        op = self

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                output = op.run(*args)
                setup_context(ctx, args, output)
                return output

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        Function.__name__ = self.name.replace("::", "_")
        self._function = Function

    def run(self, *args):
        """The implementation for the device of the first tensor argument, without autograd."""
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        kernel = self._kernels.get(device, self._default)
        if kernel is None:
            raise NotImplementedError(f"{self.name}: no implementation for device {device!r}")
        return kernel(*args)

    def __call__(self, *args):
        if self._function is not None and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self._function.apply(*args)
        return self.run(*args)


def custom_op(name: str, fn: Optional[Callable] = None, *, mutates_args: Union[str, Sequence[str]],
              device_types: Devices = None):
    """``torch.library.custom_op(name, fn, ...)``, or an :class:`EagerOp` on torch < 2.4; without ``fn``,
    a decorator."""
    if fn is None:
        return lambda f: custom_op(name, f, mutates_args=mutates_args, device_types=device_types)
    if hasattr(torch.library, "custom_op"):
        return torch.library.custom_op(name, fn, mutates_args=mutates_args, device_types=device_types)
    return EagerOp(name, fn, device_types)


def triton_op(name: str, fn: Optional[Callable] = None, *, mutates_args: Union[str, Sequence[str]]):
    """``torch.library.triton_op(name, fn, ...)``, or :func:`custom_op` on torch < 2.6; without ``fn``, a
    decorator."""
    if fn is None:
        return lambda f: triton_op(name, f, mutates_args=mutates_args)
    if hasattr(torch.library, "triton_op"):
        return torch.library.triton_op(name, fn, mutates_args=mutates_args)
    return custom_op(name, fn, mutates_args=mutates_args)


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``, or ``kernel`` itself on torch < 2.6."""
    return torch.library.wrap_triton(kernel) if hasattr(torch.library, "wrap_triton") else kernel
