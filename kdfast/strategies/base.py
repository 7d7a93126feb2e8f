"""A strategy: a tap plan plus a loss on the taps, as an ``nn.Module`` that owns its projections.

The teacher is held but not registered as a submodule: it never trains, never moves with
``.to()`` on the strategy, and stays out of ``state_dict``/``trainable_parameters``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdfast.models import DistillPair, ModelTaps, Plan, check_same_inputs

IGNORE_INDEX = -100


@dataclass
class StrategyOutput:
    """``loss``: what the trainer back-propagates; ``parts``: its named terms (weights applied);
    ``mlm_loss``: the student's unweighted MLM cross-entropy on the masked positions, or None for
    a strategy trained without MLM (tinybert, minilm, minilm_v2 unless ``mlm_weight`` > 0)."""

    loss: torch.Tensor
    parts: dict = field(default_factory=dict)
    mlm_loss: Optional[torch.Tensor] = None


def mlm_cross_entropy(taps: ModelTaps, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over positions whose label != -100; logits only for those rows; 0 when none."""
    rows = labels != IGNORE_INDEX
    logits = taps.logits(rows)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels[rows])


class Strategy(nn.Module):
    """Base class: subclasses set ``name``, build a ``Plan`` and implement ``loss``."""

    name = ""
    uses_teacher = True     # runs a teacher forward every step
    vocab_kd = False        # its KD term compares vocabulary distributions on the masked rows
    trains_mlm_head = True  # trains the student's MLM head unless its options say otherwise

    def __init__(self, teacher: Optional[nn.Module], student: nn.Module, plan: Plan,
                 formulation: str = "canonical"):
        super().__init__()
        self.formulation = formulation
        self.pair = DistillPair(teacher if self.uses_teacher else None, student, plan)

    @property
    def plan(self) -> Plan:
        return self.pair.plan

    @property
    def student(self) -> nn.Module:
        return self.pair.student

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self.pair.teacher

    def train(self, mode: bool = True) -> "Strategy":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> list:
        """Student parameters plus those the strategy owns (e.g. TinyBERT's projection)."""
        return [p for p in self.parameters() if p.requires_grad]

    def teacher_pass(self, batch: dict) -> Optional[ModelTaps]:
        """Frozen teacher forward keeping the plan's teacher taps (None when no teacher is used)."""
        if not self.uses_teacher:
            return None
        return self.pair.teacher_pass(self.pair.check(batch))

    def student_pass(self, batch: dict, taps: Optional[ModelTaps]) -> StrategyOutput:
        """Student forward + loss on this batch and the teacher ``taps`` of the same batch."""
        batch = self.pair.check(batch)
        if self.uses_teacher:
            if taps is None:
                raise ValueError(f"taps: expected the teacher taps of teacher_pass(batch) for strategy "
                                 f"{self.name!r}, got None")
            check_same_inputs(taps, batch)
        return self.loss(batch, self.pair.student_pass(batch), taps)

    def forward(self, batch: dict) -> StrategyOutput:
        return self.student_pass(batch, self.teacher_pass(batch))

    def loss(self, batch: dict, student: ModelTaps, teacher: Optional[ModelTaps]) -> StrategyOutput:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, formulation={self.formulation!r}"
