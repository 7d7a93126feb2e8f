"""The budget clock: what one arm has spent, when it must stop, and the LR factor at that point.

Policy (README "Budget clock"):
- counted: every training step from the moment ``start()`` is called after setup: data loading,
  teacher forward, student forward/backward, loss, optimizer, and any ``torch.compile`` warm-up;
- not counted: whatever runs inside ``paused()`` (held-out evaluation and checkpoint writes);
- units (``kdfast.budget.units``): ``s`` of device time (wall seconds x world size), ``tok`` (student
  input tokens over all ranks), or ``flop`` (tokens x the strategy's analytic FLOPs per token,
  ``kdfast.budget.flops.analytic_step_flops``, from the model configs; no calibration involved);
- the elapsed budget lives in ``state_dict()`` so a resumed run continues it;
- under torchrun the spent amount is the maximum over ranks, so every rank takes the same stop
  decision and the same LR on the same step.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator, Optional

import torch

from kdfast.budget.units import Budget
from kdfast.runtime.distributed import Context, max_across


def lr_factor(fraction: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction of the budget, then linear decay to 0."""
    fraction = min(max(fraction, 0.0), 1.0)
    if warmup > 0 and fraction < warmup:
        return fraction / warmup
    return max(0.0, (1.0 - fraction) / max(1.0 - warmup, 1e-12))


class BudgetClock:
    """Spends ``budget``; ``offset`` (in the budget's unit) was already spent elsewhere (a charged teacher)."""

    def __init__(self, budget: Budget, context: Optional[Context] = None,
                 flop_per_token: Optional[float] = None, offset: float = 0.0):
        if budget.unit == "flop" and not flop_per_token:
            raise ValueError("flop_per_token: expected the strategy's FLOPs per token for a FLOP budget, got none")
        self.amount, self.unit, self.offset = float(budget.amount), budget.unit, float(offset)
        self.context = context or Context()
        self.flop_per_token = flop_per_token
        self.seconds = 0.0          # counted wall seconds of this process (before the current start)
        self.tokens = 0             # tokens processed over all ranks
        self.steps = 0
        self._started: Optional[float] = None
        self._last_step_cost = 0.0
        self._spent = self.offset

    def _now(self) -> float:
        if self.context.device.type == "cuda":
            torch.cuda.synchronize(self.context.device)
        return time.perf_counter()

    def start(self) -> None:
        """Begin (or, after a resume, continue) counting."""
        self._started = self._now()

    def _counted_seconds(self) -> float:
        return self.seconds + (self._now() - self._started if self._started is not None else 0.0)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Work inside this block is not charged (evaluation, checkpoint writes)."""
        running = self._started is not None
        if running:
            self.seconds = self._counted_seconds()
            self._started = None
        try:
            yield
        finally:
            if running:
                self.start()

    def _measure(self) -> float:
        if self.unit == "s":
            return self._counted_seconds() * self.context.world
        if self.unit == "tok":
            return float(self.tokens)
        return self.tokens * self.flop_per_token

    def record_step(self, tokens: int) -> None:
        """Account one optimizer step that processed ``tokens`` tokens over all ranks, then agree
        across ranks on the amount spent."""
        before = self._spent
        self.steps += 1
        self.tokens += int(tokens)
        self._spent = max_across(self.offset + self._measure(), self.context)
        self._last_step_cost = self._spent - before

    @property
    def spent(self) -> float:
        """Budget used so far, in ``unit`` (including ``offset``), as agreed at the last step."""
        return self._spent

    @property
    def fraction(self) -> float:
        return min(self._spent / self.amount, 1.0)

    def reached(self, amount: float) -> bool:
        """True once another step would end further from ``amount`` than stopping now does."""
        return self._spent + 0.5 * self._last_step_cost >= amount

    def done(self) -> bool:
        """True at the step that ends closest to the budget (see ``reached``)."""
        return self.reached(self.amount)

    def state_dict(self) -> dict:
        return {"unit": self.unit, "amount": self.amount, "offset": self.offset, "steps": self.steps,
                "tokens": self.tokens, "seconds": self._counted_seconds(), "spent": self._spent,
                "last_step_cost": self._last_step_cost}

    def load_state_dict(self, state: dict) -> None:
        if state["unit"] != self.unit or state["amount"] != self.amount:
            raise ValueError(f"resume: expected a checkpoint with budget {self.amount} {self.unit}, got "
                             f"{state['amount']} {state['unit']}; resume with the same budget")
        self.steps, self.tokens = int(state["steps"]), int(state["tokens"])
        self.seconds, self._spent = float(state["seconds"]), float(state["spent"])
        self._last_step_cost = float(state["last_step_cost"])
        self._started = None
