"""``DistillPair``: a frozen teacher pass and a student pass on one batch, keeping a plan's taps."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdfast.models.checks import check_batch, check_vocab
from kdfast.models.forward import base_model, tapped_forward
from kdfast.models.plan import ModelPlan, Plan
from kdfast.models.taps import ModelTaps, Taps

_compiled: dict = {}


def run_model(model: nn.Module, batch: dict, plan: ModelPlan) -> ModelTaps:
    """``tapped_forward`` on a batch dict, through ``torch.compile`` when the model asks for it
    (``load_teacher(..., compile=True)``)."""
    forward = tapped_forward
    if getattr(model, "kdfast_compile", False):
        forward = _compiled.setdefault("tapped_forward", torch.compile(tapped_forward, dynamic=False))
    return forward(model, batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"), plan)


class DistillPair(nn.Module):
    """Teacher (frozen, not a registered submodule: it never trains nor appears in the student's
    state) plus student, run with ``plan``. ``forward(batch)`` returns :class:`Taps`."""

    def __init__(self, teacher: Optional[nn.Module], student: nn.Module, plan: Plan):
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)
        self.plan = plan
        plan.student.validate("student", len(base_model(student).encoder.layer))
        if teacher is not None:
            check_vocab(teacher, student)
            if plan.teacher is not None:
                plan.teacher.validate("teacher", len(base_model(teacher).encoder.layer))
        elif plan.teacher is not None and not plan.teacher.empty:
            raise ValueError("teacher: expected a teacher model because the plan taps the teacher, got None")

    def check(self, batch: dict) -> dict:
        """Validated batch (token_type_ids filled) for both models."""
        models = [("student", self.student)] + ([("teacher", self.teacher)] if self.teacher is not None else [])
        return check_batch(batch, *models)

    def teacher_pass(self, batch: dict) -> Optional[ModelTaps]:
        """Frozen teacher forward (no autograd, eval mode); None when the plan has no teacher side.

        Runs under ``torch.no_grad`` rather than ``inference_mode``: inference tensors cannot be
        saved for backward, and the fused losses save teacher q/k for their backward pass.
        """
        if self.teacher is None or self.plan.teacher is None:
            return None
        self.teacher.eval()
        with torch.no_grad():
            return run_model(self.teacher, batch, self.plan.teacher)

    def student_pass(self, batch: dict) -> ModelTaps:
        """Student forward under the caller's grad mode and train/eval mode."""
        return run_model(self.student, batch, self.plan.student)

    def forward(self, batch: dict) -> Taps:
        batch = self.check(batch)
        teacher = self.teacher_pass(batch)
        return Taps(student=self.student_pass(batch), teacher=teacher)
