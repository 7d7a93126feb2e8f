"""Strategies on the MLM head: no-kd (MLM only), vanilla KD and DistilBERT.

The KD terms run :func:`kdfast.fused_linear_kd` on the tapped pre-decoder states and the decoder
weights of both models: no full [B*L, V] logits are materialised on the kernel backends, and the
MLM cross-entropy uses the same student logits.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from kdfast import _checks as check
from kdfast.losses.methods import FORMULATIONS, distilbert
from kdfast.losses.vocab import fused_linear_kd
from kdfast.models import ModelPlan, ModelTaps, Plan, base_model
from kdfast.strategies.base import IGNORE_INDEX, Strategy, StrategyOutput, mlm_cross_entropy


class NoKD(Strategy):
    """Pretraining from scratch: the student's MLM cross-entropy on masked positions."""

    name = "no-kd"
    uses_teacher = False

    def __init__(self, teacher: Optional[nn.Module], student: nn.Module, formulation: str = "canonical"):
        super().__init__(None, student, Plan(student=ModelPlan(decoder=True)), formulation)

    def loss(self, batch, student: ModelTaps, teacher) -> StrategyOutput:
        mlm = mlm_cross_entropy(student, batch["labels"])
        return StrategyOutput(mlm, {"mlm": mlm}, mlm)


def vanilla_options(formulation: str, temperature: float, alpha: float) -> "tuple[float, float]":
    """Checked (temperature, alpha) of vanilla KD (live or cached)."""
    check.choice("formulation", formulation, FORMULATIONS)
    temperature = check.positive("temperature", temperature)
    alpha = check.non_negative("alpha", alpha)
    if alpha > 1:
        raise ValueError(f"alpha: expected a weight in [0, 1], got {alpha}")
    return temperature, alpha


class Vanilla(Strategy):
    """Hinton KD on the MLM logits of masked positions plus MLM.

    canonical: ``alpha * T^2 * KL(p_t^T || q_s^T)`` (batchmean) + ``(1 - alpha) * MLM``
    (options ``temperature``=1.0, ``alpha``=0.5). paper: the study's vanilla KD, which is
    :func:`kdfast.distilbert` with ``formulation="paper"`` (soft CE, T=1, mean over rows x V, + MLM).
    """

    name = "vanilla"
    vocab_kd = True

    def __init__(self, teacher: nn.Module, student: nn.Module, formulation: str = "canonical",
                 temperature: float = 1.0, alpha: float = 0.5):
        self.temperature, self.alpha = vanilla_options(formulation, temperature, alpha)
        side = ModelPlan(decoder=True)
        super().__init__(teacher, student, Plan(student=side, teacher=side), formulation)

    def loss(self, batch, student: ModelTaps, teacher: ModelTaps) -> StrategyOutput:
        labels = batch["labels"]
        if self.formulation == "paper":
            out = distilbert(student.decoder_input, student.decoder_weight, teacher.decoder_input,
                             teacher.decoder_weight, labels, student.decoder_bias, teacher.decoder_bias,
                             formulation="paper")
            return StrategyOutput(out.loss, out.parts, out.mlm)
        hs, ht = student.decoder_input, teacher.decoder_input
        out = fused_linear_kd(hs.reshape(-1, hs.shape[-1]), student.decoder_weight, ht.reshape(-1, ht.shape[-1]),
                              teacher.decoder_weight, student.decoder_bias, teacher.decoder_bias,
                              labels=labels.reshape(-1), ignore_index=IGNORE_INDEX, temperature=self.temperature,
                              kd_weight=self.alpha, mlm_weight=1.0 - self.alpha, kind="kl", reduction="batchmean")
        return StrategyOutput(out.loss, {"kd": self.alpha * out.kd, "mlm": (1.0 - self.alpha) * out.mlm}, out.mlm)


class DistilBERT(Strategy):
    """:func:`kdfast.distilbert` (canonical: 5 KL(T=2) + 2 MLM + 1 cosine; paper: soft CE + MLM)."""

    name = "distilbert"
    vocab_kd = True

    def __init__(self, teacher: nn.Module, student: nn.Module, formulation: str = "canonical"):
        check.choice("formulation", formulation, FORMULATIONS)
        n_s = len(base_model(student).encoder.layer)
        n_t = len(base_model(teacher).encoder.layer)
        if formulation == "canonical":
            width_s, width_t = base_model(student).config.hidden_size, base_model(teacher).config.hidden_size
            if width_s != width_t:
                raise ValueError(f"student: expected the teacher's hidden width {width_t} for DistilBERT's canonical "
                                 f"cosine loss, got {width_s}; use formulation='paper' or a student as wide as the "
                                 f"teacher")
            plan = Plan(student=ModelPlan(decoder=True, hidden=(n_s,)), teacher=ModelPlan(decoder=True, hidden=(n_t,)))
        else:
            plan = Plan(student=ModelPlan(decoder=True), teacher=ModelPlan(decoder=True))
        super().__init__(teacher, student, plan, formulation)

    def loss(self, batch, student: ModelTaps, teacher: ModelTaps) -> StrategyOutput:
        last_s = student.hidden.get(student.num_layers)
        last_t = teacher.hidden.get(teacher.num_layers)
        out = distilbert(student.decoder_input, student.decoder_weight, teacher.decoder_input, teacher.decoder_weight,
                         batch["labels"], student.decoder_bias, teacher.decoder_bias,
                         attention_mask=batch.get("attention_mask"), student_last_hidden=last_s,
                         teacher_last_hidden=last_t, formulation=self.formulation)
        return StrategyOutput(out.loss, out.parts, out.mlm)
