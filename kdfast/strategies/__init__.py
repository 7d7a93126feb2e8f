"""Distillation strategies: ``build(name, teacher, student, formulation, **options) -> Strategy``.

A strategy is an ``nn.Module`` holding a tap plan, the student (and any projection it trains) and
the frozen teacher; ``forward(batch)`` = ``student_pass(batch, teacher_pass(batch))``.
"""
from __future__ import annotations

import inspect
from typing import Optional

from torch import nn

from kdfast.strategies.attention import MiniLM, MiniLMv2, TinyBERT
from kdfast.strategies.base import Strategy, StrategyOutput, mlm_cross_entropy
from kdfast.strategies.cached import CACHED, VanillaCached
from kdfast.strategies.vocab import DistilBERT, NoKD, Vanilla

STRATEGIES = {cls.name: cls for cls in (NoKD, Vanilla, DistilBERT, TinyBERT, MiniLM, MiniLMv2)} | CACHED
NAMES = tuple(STRATEGIES)
LIVE = tuple(name for name in NAMES if name not in CACHED)  # the strategies whose batches need no teacher cache


def options(name: str) -> tuple[str, ...]:
    """The keyword options ``build`` accepts for strategy ``name`` (besides formulation)."""
    params = inspect.signature(STRATEGIES[name].__init__).parameters
    return tuple(p for p in params if p not in ("self", "teacher", "student", "formulation"))


def build(name: str, teacher: Optional[nn.Module], student: nn.Module, formulation: str = "canonical",
          **strategy_options) -> Strategy:
    """The strategy ``name`` (one of :data:`NAMES`) for this teacher and student."""
    if name not in STRATEGIES:
        raise ValueError(f"name: expected one of {', '.join(map(repr, NAMES))}, got {name!r}")
    allowed = options(name)
    unknown = sorted(set(strategy_options) - set(allowed))
    if unknown:
        raise ValueError(f"options: expected options of {name!r} among {list(allowed) or 'none'}, got {unknown}")
    cls = STRATEGIES[name]
    if cls.uses_teacher and teacher is None:
        raise ValueError(f"teacher: expected a teacher model for strategy {name!r}, got None (use 'no-kd' to train "
                         f"without one)")
    return cls(teacher, student, formulation=formulation, **strategy_options)


__all__ = ["build", "NAMES", "LIVE", "STRATEGIES", "options", "Strategy", "StrategyOutput", "mlm_cross_entropy",
           "NoKD", "Vanilla", "DistilBERT", "TinyBERT", "MiniLM", "MiniLMv2", "VanillaCached", "CACHED"]
