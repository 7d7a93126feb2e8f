"""The phase hook with which benchmarks time the fused pass's phases (``kdfast/bench/ops/vocab_kd.py``)."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

_PHASE_HOOK: "list[Optional[Callable[[str], None]]]" = [None]  # the hook in force, set by phase_hook


@contextlib.contextmanager
def phase_hook(hook: Callable[[str], None]):
    """Within the block, the fused driver calls ``hook(phase)`` as each phase of each chunk ends:
    ``"start"`` (chunk begins), ``"student_logits"``, ``"teacher_logits"`` (with top-k), ``"row_kernel"``,
    ``"d_hidden"`` (with the bf16 split of the gradient), ``"d_weight"``. Off (the default) it costs one
    empty call per phase."""
    previous, _PHASE_HOOK[0] = _PHASE_HOOK[0], hook
    try:
        yield
    finally:
        _PHASE_HOOK[0] = previous


def no_mark(phase: str) -> None:
    """The hook when none is in force."""


def current_hook() -> Callable[[str], None]:
    """The hook in force, or one that does nothing."""
    return _PHASE_HOOK[0] or no_mark
