"""The one training step, shared by the budget calibration and the trainer.

Per micro-batch: data (next batch, moved to the device) -> teacher forward (no grad) -> student
forward + loss + backward; then gradient clipping and the optimizer step. With ``timing=True``
each phase is timed (CUDA events on GPU, ``perf_counter`` on CPU, where ops run synchronously) and
the time spent inside kdfast loss ops (forward and backward) is reported as ``kd_loss`` and taken
out of ``student_fwd_bwd``. With ``timing=False`` no event, hook or synchronisation is added.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

import torch

from kdfast.budget.observe import observe_ops

PHASES = ("data", "teacher_forward", "student_fwd_bwd", "kd_loss", "optimizer")
Batch = dict


@dataclass
class StepResult:
    """One optimizer step. Tensors are detached and stay on the device (no host sync).

    ``loss``/``mlm_loss``/``parts``: means over the micro-batches; ``tokens``: student input tokens
    (all positions of ``input_ids``); ``grad_norm``: total norm before clipping (None without
    clipping); ``phase_ms``: milliseconds per phase of :data:`PHASES` (None unless timing).
    """

    loss: torch.Tensor
    mlm_loss: Optional[torch.Tensor]
    parts: dict
    tokens: int
    grad_norm: Optional[torch.Tensor] = None
    phase_ms: Optional[dict] = None


class Stopwatch:
    """Time stamps on one device: recorded CUDA events, or ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


@dataclass
class _PhaseLog:
    """Stamps collected during one step; read once the step has finished."""

    watch: Stopwatch
    spans: list = field(default_factory=list)  # (phase, start stamp, end stamp)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = self.watch.stamp()
        yield
        self.spans.append((name, start, self.watch.stamp()))

    def observe_kd_op(self, op: str, direction: str, kwargs: dict):
        return self.phase("kd_loss")

    def totals_ms(self) -> dict:
        if self.watch.cuda:
            torch.cuda.synchronize()
        totals = dict.fromkeys(PHASES, 0.0)
        for name, start, end in self.spans:
            totals[name] += self.watch.elapsed_ms(start, end)
        totals["student_fwd_bwd"] = max(totals["student_fwd_bwd"] - totals["kd_loss"], 0.0)
        return totals


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Tensors of ``batch`` on ``device`` (non-blocking from pinned memory)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class TrainStep:
    """Callable running one optimizer step of ``strategy`` (the kdfast.strategies API).

    ``batches``: an iterable of batch dicts (``input_ids``, ``attention_mask``, ``token_type_ids``,
    ``labels``: [B, L]) or a zero-argument function returning one. ``grad_clip``: max total grad
    norm (None: no clipping). ``accumulation``: micro-batches per optimizer step. ``bf16``: bf16
    autocast for both forwards (default: on for CUDA, off on CPU).
    """

    def __init__(self, strategy: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 batches: Union[Iterable[Batch], Callable[[], Batch]], device: Union[str, torch.device],
                 grad_clip: Optional[float] = 1.0, accumulation: int = 1, bf16: Optional[bool] = None,
                 timing: bool = False):
        if isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1:
            raise ValueError(f"accumulation: expected an int >= 1, got {accumulation!r}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip: expected None or a number > 0, got {grad_clip!r}")
        self.strategy, self.optimizer = strategy, optimizer
        self.device = torch.device(device)
        self.next_batch: Callable[[], Batch] = batches if callable(batches) else iter(batches).__next__
        self.grad_clip, self.accumulation, self.timing = grad_clip, accumulation, timing
        self.bf16 = self.device.type == "cuda" if bf16 is None else bf16
        self.parameters = [p for p in strategy.trainable_parameters() if p.requires_grad]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def __call__(self) -> StepResult:
        log = _PhaseLog(Stopwatch(self.device)) if self.timing else None
        phase = log.phase if log else (lambda name: contextlib.nullcontext())
        observing = observe_ops(log.observe_kd_op) if log else contextlib.nullcontext()
        losses, mlm_losses, parts, tokens = [], [], {}, 0
        with observing:
            for _ in range(self.accumulation):
                with phase("data"):
                    batch = to_device(self.next_batch(), self.device)
                with phase("teacher_forward"), torch.no_grad(), self._autocast():
                    taps = self.strategy.teacher_pass(batch)
                with phase("student_fwd_bwd"):
                    with self._autocast():
                        out = self.strategy.student_pass(batch, taps)
                    (out.loss / self.accumulation).backward()
                tokens += batch["input_ids"].numel()
                losses.append(out.loss.detach())
                if out.mlm_loss is not None:
                    mlm_losses.append(out.mlm_loss.detach())
                for name, value in (out.parts or {}).items():
                    parts.setdefault(name, []).append(torch.as_tensor(value).detach())
            with phase("optimizer"):
                grad_norm = None
                if self.grad_clip is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=torch.stack(losses).mean(),
                          mlm_loss=torch.stack(mlm_losses).mean() if mlm_losses else None,
                          parts={k: torch.stack(v).mean() for k, v in parts.items()}, tokens=tokens,
                          grad_norm=grad_norm, phase_ms=log.totals_ms() if log else None)

