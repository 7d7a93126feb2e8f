"""Strategies on attention and hidden states: TinyBERT, MiniLM (v1), MiniLMv2.

Each plans only the layers its loss reads (TinyBERT's uniform map or last/first layers, MiniLM's
last layer, MiniLMv2's chosen teacher layer) and calls the strategy losses of
:mod:`kdfast.losses.methods`. ``mlm_weight`` > 0 adds the student's MLM cross-entropy (the
sources train without it; off by default).
"""
from __future__ import annotations

import math
from typing import Optional

from torch import nn

from kdfast import _checks as check
from kdfast.losses.methods import (
    FORMULATIONS,
    StrategyLoss,
    minilm,
    minilm_v2,
    minilm_v2_defaults,
    tinybert,
    tinybert_layer_map,
)
from kdfast.models import ModelPlan, ModelTaps, Plan, base_model
from kdfast.strategies.base import Strategy, StrategyOutput, mlm_cross_entropy


def _shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, hidden width, attention heads)."""
    config = base_model(model).config
    return len(base_model(model).encoder.layer), config.hidden_size, config.num_attention_heads


def _same_heads(teacher: nn.Module, student: nn.Module, what: str, fix: str) -> None:
    heads_s, heads_t = _shape(student)[2], _shape(teacher)[2]
    if heads_s != heads_t:
        raise ValueError(f"student: expected the teacher's {heads_t} attention heads for {what}, got {heads_s}; "
                         f"{fix}")


class _AttentionStrategy(Strategy):
    trains_mlm_head = False  # mlm_weight = 0 by default
    """Adds the optional MLM term and the StrategyLoss -> StrategyOutput step."""

    def __init__(self, teacher, student, plan: Plan, formulation: str, mlm_weight: float):
        self.mlm_weight = check.non_negative("mlm_weight", mlm_weight)
        if self.mlm_weight:
            plan = Plan(student=ModelPlan(q=plan.student.q, k=plan.student.k, v=plan.student.v,
                                          hidden=plan.student.hidden, decoder=True), teacher=plan.teacher)
        super().__init__(teacher, student, plan, formulation)

    def _output(self, out: StrategyLoss, batch: dict, student: ModelTaps) -> StrategyOutput:
        if not self.mlm_weight:
            return StrategyOutput(out.loss, out.parts, None)
        mlm = mlm_cross_entropy(student, batch["labels"])
        parts = dict(out.parts, mlm=self.mlm_weight * mlm)
        return StrategyOutput(out.loss + parts["mlm"], parts, mlm)


class TinyBERT(_AttentionStrategy):
    """:func:`kdfast.tinybert`; canonical owns ``proj`` = TinyBERT's ``fit_dense`` (Hs -> Ht)."""

    name = "tinybert"

    def __init__(self, teacher: nn.Module, student: nn.Module, formulation: str = "canonical",
                 mlm_weight: float = 0.0):
        check.choice("formulation", formulation, FORMULATIONS)
        (n_s, width_s, _), (n_t, width_t, _) = _shape(student), _shape(teacher)
        _same_heads(teacher, student, "TinyBERT's attention-score MSE",
                    "build the student with the teacher's head count (num_attention_heads=...) or use minilm_v2")
        if formulation == "paper" and width_s != width_t:
            raise ValueError(f"student: expected the teacher's hidden width {width_t} for the paper TinyBERT "
                             f"formulation (hidden MSE without projection), got {width_s}; use "
                             f"formulation='canonical' (learned projection) or a student as wide as the teacher")
        att_pairs, hid_pairs = tinybert_layer_map(n_s, n_t, formulation)
        s_layers, t_layers = [i for i, _ in att_pairs], [j for _, j in att_pairs]
        plan = Plan(student=ModelPlan(q=s_layers, k=s_layers, hidden=[i for i, _ in hid_pairs]),
                    teacher=ModelPlan(q=t_layers, k=t_layers, hidden=[j for _, j in hid_pairs]))
        super().__init__(teacher, student, plan, formulation, mlm_weight)
        self.proj = None
        if formulation == "canonical":
            device = next(student.parameters()).device
            self.proj = nn.Linear(width_s, width_t, device=device)

    def loss(self, batch, student: ModelTaps, teacher: ModelTaps) -> StrategyOutput:
        out = tinybert(student.layer_list("q"), student.layer_list("k"), teacher.layer_list("q"),
                       teacher.layer_list("k"), student.hidden_list(), teacher.hidden_list(),
                       attention_mask=batch.get("attention_mask"), proj=self.proj, formulation=self.formulation)
        return self._output(out, batch, student)


class MiniLM(_AttentionStrategy):
    """:func:`kdfast.minilm` on the last layers (attention KL + value relation)."""

    name = "minilm"

    def __init__(self, teacher: nn.Module, student: nn.Module, formulation: str = "canonical",
                 mlm_weight: float = 0.0):
        check.choice("formulation", formulation, FORMULATIONS)
        _same_heads(teacher, student, "MiniLM v1's attention KL",
                    "build the student with the teacher's head count or use minilm_v2 (relation heads)")
        last_s, last_t = _shape(student)[0] - 1, _shape(teacher)[0] - 1
        plan = Plan(student=ModelPlan(q=[last_s], k=[last_s], v=[last_s]),
                    teacher=ModelPlan(q=[last_t], k=[last_t], v=[last_t]))
        super().__init__(teacher, student, plan, formulation, mlm_weight)

    def loss(self, batch, student: ModelTaps, teacher: ModelTaps) -> StrategyOutput:
        i, j = student.num_layers - 1, teacher.num_layers - 1
        out = minilm(student.q[i], student.k[i], student.v[i], teacher.q[j], teacher.k[j], teacher.v[j],
                     attention_mask=batch.get("attention_mask"), formulation=self.formulation)
        return self._output(out, batch, student)


class MiniLMv2(_AttentionStrategy):
    """:func:`kdfast.minilm_v2`: Q-Q, K-K, V-V relations of the student's last layer and the teacher's
    ``teacher_layer`` (0-based), split into ``num_relation_heads`` (defaults:
    :func:`kdfast.losses.methods.minilm_v2_defaults`)."""

    name = "minilm_v2"

    def __init__(self, teacher: nn.Module, student: nn.Module, formulation: str = "canonical",
                 num_relation_heads: Optional[int] = None, teacher_layer: Optional[int] = None,
                 mlm_weight: float = 0.0):
        check.choice("formulation", formulation, FORMULATIONS)
        (n_s, width_s, _), (n_t, width_t, heads_t) = _shape(student), _shape(teacher)
        default_layer, default_heads = minilm_v2_defaults(n_t, width_t, heads_t, formulation)
        self.teacher_layer = default_layer if teacher_layer is None else teacher_layer
        self.num_relation_heads = default_heads if num_relation_heads is None else num_relation_heads
        heads = self.num_relation_heads
        if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
            raise ValueError(f"num_relation_heads: expected a positive int, got {heads!r}")
        if width_s % heads or width_t % heads:
            common = math.gcd(width_s, width_t)
            options = [a for a in range(1, common + 1) if common % a == 0 and common // a <= 128][:8]
            raise ValueError(f"num_relation_heads: expected a divisor of both hidden widths (student {width_s}, "
                             f"teacher {width_t}), got {heads}; pass num_relation_heads= a common divisor, "
                             f"e.g. one of {options}")
        if not 0 <= self.teacher_layer < n_t:
            raise ValueError(f"teacher_layer: expected a layer in 0..{n_t - 1} (the teacher has {n_t} layers, "
                             f"0-based), got {self.teacher_layer}; pass teacher_layer within range or leave it "
                             f"unset for the default")
        last_s, layer_t = n_s - 1, self.teacher_layer
        plan = Plan(student=ModelPlan(q=[last_s], k=[last_s], v=[last_s]),
                    teacher=ModelPlan(q=[layer_t], k=[layer_t], v=[layer_t]))
        super().__init__(teacher, student, plan, formulation, mlm_weight)

    def loss(self, batch, student: ModelTaps, teacher: ModelTaps) -> StrategyOutput:
        i, j = student.num_layers - 1, self.teacher_layer
        cat = ModelTaps.concat
        out = minilm_v2(cat(student.q[i]), cat(student.k[i]), cat(student.v[i]), cat(teacher.q[j]),
                        cat(teacher.k[j]), cat(teacher.v[j]), self.num_relation_heads,
                        attention_mask=batch.get("attention_mask"), formulation=self.formulation)
        return self._output(out, batch, student)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, teacher_layer={self.teacher_layer}, "
                f"num_relation_heads={self.num_relation_heads}")


__all__ = ["TinyBERT", "MiniLM", "MiniLMv2"]
