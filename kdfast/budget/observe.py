"""Observe every kdfast loss call, forward and backward, without touching the kernels.

Every public loss goes through ``kdfast._backends.call(op, device, backend, **kwargs)``. Inside
:func:`observe_ops` that call is routed through an autograd Function that runs the op on detached
inputs and replays its graph in backward, so an observer sees both directions of each op:
``observer(op, direction, kwargs)`` returns a context manager entered around the work
(direction is ``"forward"`` or ``"backward"``). The per-phase timer of the training step and the
FLOP counter use it; outside the context nothing is patched and nothing costs anything.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

import torch

from kdfast import _backends

Observer = Callable[[str, str, dict], ContextManager]


def _tensors(value) -> list[torch.Tensor]:
    """The tensors of an op's result: a tensor or a tuple of tensors (``KDOutput``)."""
    return [value] if isinstance(value, torch.Tensor) else list(value)


def _rebuild(like, tensors: tuple[torch.Tensor, ...]):
    if isinstance(like, torch.Tensor):
        return tensors[0]
    return type(like)(*tensors)


class _Observed(torch.autograd.Function):
    """Runs ``call`` on detached copies of the tensor arguments and replays its graph in backward."""

    @staticmethod
    def forward(ctx, spec: dict, *tensors: torch.Tensor):
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
            kwargs = {**spec["kwargs"], **dict(zip(spec["names"], inputs))}
            with spec["observer"](spec["op"], "forward", kwargs):
                result = spec["call"](**kwargs)
        outputs = _tensors(result)
        spec["result"] = result  # read by observed_call to rebuild a KDOutput
        ctx.spec, ctx.inputs, ctx.outputs, ctx.kwargs = spec, inputs, outputs, kwargs
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        pairs = [(o, g) for o, g in zip(ctx.outputs, grads) if o.requires_grad and g is not None]
        wanted = [i for i in ctx.inputs if i.requires_grad]
        found = iter(())
        if pairs and wanted:
            with ctx.spec["observer"](ctx.spec["op"], "backward", ctx.kwargs):
                found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                                 allow_unused=True))
        return (None, *(next(found) if i.requires_grad else None for i in ctx.inputs))


@contextlib.contextmanager
def observe_ops(observer: Observer) -> Iterator[None]:
    """Route every kdfast op call through ``observer`` while the context is open (not reentrant)."""
    original = _backends.call

    def observed_call(op: str, device: torch.device, backend: str, **kwargs):
        names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]

        def call(**kw):
            return original(op, device, backend, **kw)

        if not torch.is_grad_enabled() or not any(kwargs[n].requires_grad for n in names):
            with observer(op, "forward", kwargs):
                return call(**kwargs)
        spec = dict(op=op, call=call, observer=observer, names=names,
                    kwargs={k: v for k, v in kwargs.items() if k not in names})
        result_tensors = _Observed.apply(spec, *(kwargs[n] for n in names))
        return _rebuild(spec.pop("result"), result_tensors)

    _backends.call = observed_call
    try:
        yield
    finally:
        _backends.call = original
