"""Which implementation serves a call.

An implementation of op ``X`` on backend ``B`` is the function ``X`` in module
``kdfast.<package(B)>.X`` (for example ``kdfast.cpu.relation_kl.relation_kl``). A backend
without that module does not implement the op. A module may also define
``unsupported_reason(**kwargs) -> str | None`` to decline particular inputs (say d > 128):
``auto`` then moves to the next backend, while an explicit request raises with that reason.

``auto`` order: CUDA tensors try triton, cuda, torch; CPU tensors try cpu, torch.
Triton serves CPU tensors only when asked explicitly under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import warnings
from typing import Callable, Optional

import torch

from kdfast import _ext

BACKENDS = ("torch", "cpu", "triton", "cuda")
PACKAGES = {"torch": "reference", "cpu": "cpu", "triton": "triton", "cuda": "cuda"}
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
OPS = ("kd_kl", "fused_linear_kd", "attention_kl", "relation_kl", "attention_score_mse", "hidden_mse")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


TRITON_MIN = (3, 0)  # the kernels use Triton 3's language (tested with 3.8); torch < 2.4 bundles Triton 2


def _triton_version() -> Optional[tuple]:
    """The installed triton's (major, minor), read from its metadata without importing it; None if absent."""
    try:
        return tuple(int(part) for part in importlib.metadata.version("triton").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


_TRITON_VERSION = _triton_version() if importlib.util.find_spec("triton") is not None else None
_TRITON_IMPORTABLE = _TRITON_VERSION is not None and _TRITON_VERSION >= TRITON_MIN  # constants torch.compile reads


def triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def backend_ready(backend: str, device: torch.device) -> Optional[str]:
    """None when ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' needs CPU tensors, got device {device}"
        return _ext.C_ERROR
    if backend == "triton":
        if _TRITON_VERSION is None:
            return "backend 'triton' needs the triton package (pip install triton; Linux only)"
        if not triton_importable():
            return (f"backend 'triton' needs triton >= {'.'.join(map(str, TRITON_MIN))}, got "
                    f"{'.'.join(map(str, _TRITON_VERSION))} (it comes with torch >= 2.4)")
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got device {device}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got device {device}"
        return _ext.CUDA_ERROR
    raise ValueError(f"backend: expected one of 'auto', {', '.join(map(repr, BACKENDS))}, got {backend!r}")


_MODULES: dict = {}  # (op, backend) -> module or None; a plain dict, which torch.compile traces once filled


def _module(op: str, backend: str):
    if (op, backend) not in _MODULES:
        name = f"kdfast.{PACKAGES[backend]}.{op}"
        _MODULES[op, backend] = None if importlib.util.find_spec(name) is None else importlib.import_module(name)
    return _MODULES[op, backend]


def preload() -> None:
    """Import the op modules of every backend (triton only where it can run: CUDA present, or the
    interpreter), so that :func:`pick` only reads the module table while torch.compile traces a loss
    (an import inside a traced function would break the graph). ``import kdfast`` calls it."""
    usable_triton = triton_importable() and (torch.cuda.is_available() or triton_interpreting())
    for backend in BACKENDS:
        if backend != "triton" or usable_triton:
            for op in OPS:
                _module(op, backend)


def implemented(op: str, backend: str) -> bool:
    return _module(op, backend) is not None


def _decline(op: str, backend: str, device: torch.device, kwargs: dict) -> Optional[str]:
    reason = backend_ready(backend, device)
    if reason is not None:
        return reason
    module = _module(op, backend)
    if module is None:
        return f"op {op!r} has no {backend!r} implementation"
    check = getattr(module, "unsupported_reason", None)
    # With no arguments (``kdfast info``) this asks only whether the backend can serve the op at all.
    return check(**kwargs) if check is not None and kwargs else None


_warned: set = set()


def pick(op: str, device: torch.device, backend: str = "auto", **kwargs) -> str:
    """Name of the backend that will run ``op`` on ``device`` for these (validated) arguments."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    if backend != "auto":
        reason = _decline(op, backend, device, kwargs)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run {op}: {reason}. backend='torch' always works")
        return backend
    missing = []  # backends absent from this install (not merely declining these inputs)
    for candidate in AUTO_ORDER.get(device.type, ("torch",)):
        reason = _decline(op, candidate, device, kwargs)
        if reason is None:
            if missing and candidate == "torch" and (op, device.type) not in _warned:
                _warned.add((op, device.type))
                warnings.warn(f"kdfast: {op} on {device.type} falls back to the torch reference: "
                              + "; ".join(missing), stacklevel=3)
            return candidate
        if backend_ready(candidate, device) is not None and implemented(op, candidate):
            missing.append(reason)
    raise AssertionError("the torch backend always accepts")  # pragma: no cover


def dispatch(op: str, device: torch.device, backend: str = "auto", **kwargs) -> Callable:
    """The implementation function chosen by :func:`pick`; call it with the same kwargs."""
    return getattr(_module(op, pick(op, device, backend, **kwargs)), op)


def call(op: str, device: torch.device, backend: str, **kwargs):
    """Pick a backend for ``op`` and run it on ``kwargs`` (already validated)."""
    return dispatch(op, device, backend, **kwargs)(**kwargs)
