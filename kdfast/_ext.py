"""Load the native extensions once; say clearly why one is missing."""
from __future__ import annotations

from types import ModuleType

_REINSTALL = "reinstall with a C++17 compiler (and nvcc for CUDA): pip install --force-reinstall --no-deps ."


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        module = __import__(f"kdfast.{name}", fromlist=[name])
    except ImportError as err:
        return None, f"kdfast.{name} is not built ({err}); {_REINSTALL}"
    return module, None


C, C_ERROR = _load("_C")
CUDA, CUDA_ERROR = _load("_cuda")


def require_cpu() -> ModuleType:
    if C is None:
        raise RuntimeError(C_ERROR)
    return C


def require_cuda() -> ModuleType:
    if CUDA is None:
        raise RuntimeError(CUDA_ERROR)
    return CUDA
