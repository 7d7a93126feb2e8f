"""Argument checks shared by every public function.

Each raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, value, device)
with one message form: ``"<arg>: expected <what>, got <what came>"``.

Checks of tensor *values* (finite entries, 0/1 masks, label ranges) read the device, so under
``torch.compile`` (:func:`values_checked` is False) they are skipped: the compiled graph stays whole,
and the eager call (or the first run of a model before compiling it) is where bad values are reported.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def values_checked() -> bool:
    """Whether checks that read tensor values run: in eager mode, not while torch.compile traces."""
    return not torch.compiler.is_compiling()


def _fail(exc: type, name: str, expected: str, got: object) -> None:
    raise exc(f"{name}: expected {expected}, got {got}")


def tensor(name: str, value: object, ndim: Optional[int] = None,
           dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """A tensor of one of ``dtypes`` with ``ndim`` dimensions."""
    if not isinstance(value, torch.Tensor):
        _fail(TypeError, name, "a torch.Tensor", type(value).__name__)
    if value.dtype not in dtypes:
        _fail(TypeError, name, "dtype in (" + ", ".join(str(d) for d in dtypes) + ")", value.dtype)
    if ndim is not None and value.dim() != ndim:
        _fail(ValueError, name, f"{ndim} dimensions", f"shape {tuple(value.shape)}")
    return value


def shape(name: str, value: torch.Tensor, expected: Sequence[Optional[int]], what: str = "") -> None:
    """``expected`` may hold None for a free dimension; ``what`` names the dimensions, e.g. '[N, V]'."""
    if value.dim() != len(expected) or any(e is not None and e != s for e, s in zip(expected, value.shape)):
        want = what or "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        _fail(ValueError, name, f"shape {want} = {tuple(expected)}".replace("None", "*"), tuple(value.shape))


def same_dtype(names: Sequence[str], values: Sequence[torch.Tensor]) -> None:
    dtypes = {v.dtype for v in values}
    if len(dtypes) > 1:
        got = ", ".join(f"{n}={v.dtype}" for n, v in zip(names, values))
        _fail(TypeError, names[-1], f"the same dtype as {names[0]}", got)


def same_device(names: Sequence[str], values: Sequence[Optional[torch.Tensor]]) -> torch.device:
    """All non-None tensors on one device; returns it."""
    pairs = [(n, v) for n, v in zip(names, values) if v is not None]
    first_name, first = pairs[0]
    for n, v in pairs[1:]:
        if v.device != first.device:
            _fail(ValueError, n, f"the device of {first_name} ({first.device})", v.device)
    return first.device


def finite(name: str, value: torch.Tensor) -> None:
    """No NaN/inf in ``value``. A NaN or inf makes the sum non-finite, so a finite sum (one cheap pass
    with no temporary) settles it; only a non-finite sum (bad entries, or an overflow) looks closer."""
    if not values_checked() or bool(torch.isfinite(value.detach().sum())) or bool(torch.isfinite(value).all()):
        return
    bad = int((~torch.isfinite(value)).sum())
    _fail(ValueError, name, "finite values (no NaN/inf)", f"{bad} non-finite entries")


def choice(name: str, value: object, choices: Iterable[object]) -> None:
    choices = tuple(choices)
    if value not in choices:
        _fail(ValueError, name, "one of " + ", ".join(repr(c) for c in choices), repr(value))


def positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(TypeError, name, "a positive number", type(value).__name__)
    if not value > 0 or value != value or value == float("inf"):
        _fail(ValueError, name, "a finite number > 0", value)
    return float(value)


def non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(TypeError, name, "a number >= 0", type(value).__name__)
    if not value >= 0 or value == float("inf"):
        _fail(ValueError, name, "a finite number >= 0", value)
    return float(value)


def unit_interval(name: str, value: object) -> float:
    """A number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(TypeError, name, "a number in [0, 1]", type(value).__name__)
    if not 0 <= value <= 1:
        _fail(ValueError, name, "a number in [0, 1]", value)
    return float(value)


def mask(name: str, value: Optional[torch.Tensor], expected: Sequence[int], device: torch.device,
         what: str = "") -> Optional[torch.Tensor]:
    """A bool (or 0/1 integer) mask of exactly ``expected`` shape, True = keep; returned as bool."""
    if value is None:
        return None
    tensor(name, value, dtypes=(torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64))
    shape(name, value, expected, what)
    if value.device != device:
        _fail(ValueError, name, f"device {device}", value.device)
    if value.dtype != torch.bool:
        if values_checked() and bool(((value != 0) & (value != 1)).any()):
            _fail(ValueError, name, "only 0/1 (or bool) entries", "other values")
        value = value.bool()
    return value


def labels(name: str, value: Optional[torch.Tensor], rows: int, vocab: int, ignore_index: int,
           device: torch.device) -> Optional[torch.Tensor]:
    """Integer labels [rows] in [0, vocab) or ``ignore_index``."""
    if value is None:
        return None
    tensor(name, value, ndim=1, dtypes=(torch.int64, torch.int32))
    shape(name, value, (rows,), "[N]")
    if value.device != device:
        _fail(ValueError, name, f"device {device}", value.device)
    if not values_checked():
        return value.long()
    kept = value[value != ignore_index]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= vocab):
        bad = kept[(kept < 0) | (kept >= vocab)][0].item()
        _fail(ValueError, name, f"values in [0, {vocab}) or ignore_index={ignore_index}", f"label {bad}")
    return value.long()


def divisible(name: str, width: int, parts: int, what: str) -> int:
    if isinstance(parts, bool) or not isinstance(parts, int) or parts <= 0:
        _fail(ValueError, "num_relation_heads", "a positive int", parts)
    if width % parts:
        _fail(ValueError, name, f"a width divisible by {what}={parts}", f"width {width}")
    return width // parts
