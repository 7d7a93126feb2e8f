"""Budgets and their conversions.

A budget is an amount of one of three currencies:

- device time, in seconds (``24h``, ``90m``, ``86400s``): seconds of device time, so under
  torchrun a job of W ranks spends W device-seconds per second of wall clock;
- FLOPs (``3e18flop``): floating-point operations summed over all ranks;
- tokens (``4.6e9tok``): input tokens processed by the student, summed over all ranks.

A :class:`Calibration` (the measured cost of one optimizer step on one rank) converts any budget
into optimizer steps, and steps into any currency, so time -> tokens -> time round-trips exactly.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

UNITS = ("s", "flop", "tok")
UNIT_NAMES = {"s": "seconds of device time", "flop": "FLOPs", "tok": "tokens"}
_SECONDS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_ALIASES = {**{suffix: "s" for suffix in _SECONDS}, "flop": "flop", "flops": "flop", "tok": "tok",
            "tokens": "tok"}
ACCEPTED_FORMS = ("24h, 90m, 86400s, 1.5d, 3e18flop or 4.6e9tok "
                  "(a number > 0 followed by s, m, h, d, flop or tok)")
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]+)\s*$")


@dataclass(frozen=True)
class Budget:
    """``amount`` of ``unit``: ``"s"`` (device-seconds), ``"flop"`` or ``"tok"``."""

    amount: float
    unit: str

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unit: expected one of {', '.join(UNITS)}, got {self.unit!r}")
        if not (isinstance(self.amount, (int, float)) and math.isfinite(self.amount) and self.amount > 0):
            raise ValueError(f"amount: expected a finite number > 0, got {self.amount!r}")

    def __str__(self) -> str:
        if self.unit == "s":
            return f"{self.amount / 3600:g}h" if self.amount >= 3600 else f"{self.amount:g}s"
        return f"{self.amount:.3g}{self.unit}"

    @property
    def tag(self) -> str:
        """The amount in its base unit with 6 significant digits, for folder names: ``'90s'``, ``'1024tok'``."""
        return f"{self.amount:g}{self.unit}"

    def describe(self) -> str:
        """Human wording, e.g. ``'24h of device time'`` or ``'3e+18 FLOPs'``."""
        if self.unit == "s":
            return f"{self} of device time"
        return f"{self.amount:.3g} {UNIT_NAMES[self.unit]}"


def parse_budget(text: str) -> Budget:
    """``'24h'`` -> ``Budget(86400.0, 's')``; raises ValueError listing the accepted forms."""
    if isinstance(text, Budget):
        return text
    if not isinstance(text, str):
        raise TypeError(f"budget: expected a string such as {ACCEPTED_FORMS}, got {type(text).__name__}")
    match = _PATTERN.match(text)
    suffix = match.group(2).lower() if match else None
    if match is None or suffix not in _ALIASES or float(match.group(1)) <= 0:
        raise ValueError(f"budget: expected {ACCEPTED_FORMS}, got {text!r}")
    amount = float(match.group(1)) * _SECONDS.get(suffix, 1.0)
    return Budget(amount, _ALIASES[suffix])


@dataclass(frozen=True)
class Calibration:
    """Measured cost of one optimizer step on one rank (gradient accumulation included).

    ``ms_per_step``: wall milliseconds; ``tokens_per_step``: student input tokens;
    ``flops_per_step``: FLOPs; ``world_size``: ranks stepping together (data parallel).
    One global step costs ``world_size`` times the per-rank seconds, tokens and FLOPs.
    """

    ms_per_step: float
    tokens_per_step: float
    flops_per_step: float
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("ms_per_step", "tokens_per_step", "flops_per_step"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size: expected an int >= 1, got {self.world_size!r}")

    def per_step(self, unit: str) -> float:
        """What one global step costs in ``unit`` (device-seconds, FLOPs or tokens, all ranks)."""
        per_rank = {"s": self.ms_per_step / 1e3, "flop": self.flops_per_step, "tok": self.tokens_per_step}
        if unit not in per_rank:
            raise ValueError(f"unit: expected one of {', '.join(UNITS)}, got {unit!r}")
        return per_rank[unit] * self.world_size

    def steps(self, budget: Budget) -> float:
        """Optimizer steps the budget buys (fractional; floor it to run)."""
        return budget.amount / self.per_step(budget.unit)

    def convert(self, budget: Budget, unit: str) -> Budget:
        """The same number of steps expressed in ``unit``."""
        return Budget(self.steps(budget) * self.per_step(unit), unit)

    def whole_steps(self, budget: Budget) -> int:
        """Whole optimizer steps within the budget; ValueError when it buys less than one."""
        steps = self.steps(budget)
        if steps < 1:
            one = Budget(self.per_step(budget.unit), budget.unit)
            raise ValueError(f"budget: expected at least one step ({one.describe()} per step "
                             f"on {self.world_size} rank(s)), got {budget.describe()} = {steps:.3g} steps")
        return int(math.floor(steps + 1e-9))

    def wall_seconds(self, budget: Budget) -> float:
        """Wall-clock seconds the budget lasts on ``world_size`` ranks."""
        return self.steps(budget) * self.ms_per_step / 1e3


def charge_fraction(text: str) -> float:
    """``none`` -> 0, ``full`` -> 1, ``amortized:N`` -> 1/N of the teacher's cost per KD arm."""
    if text in ("none", "full"):
        return 0.0 if text == "none" else 1.0
    kind, _, count = str(text).partition(":")
    if kind == "amortized" and count.isdigit() and int(count) > 0:
        return 1.0 / int(count)
    raise ValueError(f"charge_teacher: expected none, full or amortized:N (N > 0 students), got {text!r}")
