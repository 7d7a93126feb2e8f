"""One allocation spy for the tests that check a kernel never materialises a [.., L, L] tensor."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class ShapeSpy(TorchDispatchMode):
    """Records ``(op name, shape)`` of every tensor an aten op returns while the mode is active."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, tuple[int, ...]]] = []
        self.allocations: list[tuple[str, tuple[int, ...]]] = []  # the outputs on memory no input holds

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [shape for _, shape in self.outputs]

    def square(self, length: int) -> list[tuple[str, tuple[int, ...]]]:
        """The outputs whose two trailing dimensions are both ``length``."""
        return [(op, shape) for op, shape in self.outputs if len(shape) >= 2 and shape[-2:] == (length, length)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.outputs += [(str(func), tuple(t.shape)) for t in tensors]
        held = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        self.allocations += [(str(func), tuple(t.shape)) for t in tensors
                             if t.untyped_storage().data_ptr() not in held]
        return out
