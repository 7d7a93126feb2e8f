"""Vanilla KD from a teacher cache: the batch brings sparse teacher targets (``teacher_ids``,
``teacher_weights`` [M, K] for its M masked positions, from ``kdfast.cache.serve.TeacherCache``), so
the step runs no teacher forward. Same loss as :class:`kdfast.strategies.vocab.Vanilla` with the
teacher distribution replaced by the cached top-K (renormalised) or sampled targets."""
from __future__ import annotations

from typing import Optional

from torch import nn

from kdfast.cache.serve import TARGET_KEYS
from kdfast.losses.vocab import fused_linear_kd
from kdfast.models import ModelPlan, ModelTaps, Plan
from kdfast.strategies.base import IGNORE_INDEX, Strategy, StrategyOutput
from kdfast.strategies.vocab import vanilla_options


class VanillaCached(Strategy):
    """canonical: ``alpha * T^2 * KL(p̂ || q_s^T)`` (batchmean) + ``(1 - alpha) * MLM``; paper: soft CE
    at T=1 (mean over rows x V) + MLM, as :class:`~kdfast.strategies.vocab.Vanilla`."""

    uses_teacher = False  # no teacher forward; the targets come with the batch
    vocab_kd = True
    sparse_kind = ""

    def __init__(self, teacher: Optional[nn.Module], student: nn.Module, formulation: str = "canonical",
                 temperature: float = 1.0, alpha: float = 0.5):
        self.temperature, self.alpha = vanilla_options(formulation, temperature, alpha)
        super().__init__(None, student, Plan(student=ModelPlan(decoder=True)), formulation)

    def loss(self, batch, student: ModelTaps, teacher) -> StrategyOutput:
        if any(key not in batch for key in TARGET_KEYS):
            raise ValueError(f"batch: expected cached teacher targets {TARGET_KEYS} for strategy {self.name!r} "
                             f"(serve the batches through kdfast.cache.serve.TeacherCache.attach), got keys "
                             f"{sorted(batch)}")
        rows = (batch["labels"] != IGNORE_INDEX).reshape(-1)
        hidden = student.decoder_input.reshape(-1, student.decoder_input.shape[-1])[rows]
        targets = (batch[TARGET_KEYS[0]], batch[TARGET_KEYS[1]])
        common = dict(student_bias=student.decoder_bias, labels=batch["labels"].reshape(-1)[rows],
                      ignore_index=IGNORE_INDEX, teacher_targets=targets)
        if self.formulation == "paper":
            out = fused_linear_kd(hidden, student.decoder_weight, temperature=1.0, kd_weight=1.0, mlm_weight=1.0,
                                  kind="soft_ce", reduction="mean", **common)
            return StrategyOutput(out.loss, {"kd": out.kd, "mlm": out.mlm}, out.mlm)
        out = fused_linear_kd(hidden, student.decoder_weight, temperature=self.temperature, kd_weight=self.alpha,
                              mlm_weight=1.0 - self.alpha, kind="kl", reduction="batchmean", **common)
        return StrategyOutput(out.loss, {"kd": self.alpha * out.kd, "mlm": (1.0 - self.alpha) * out.mlm}, out.mlm)


class VanillaCachedTopK(VanillaCached):
    name = "vanilla-cached-topk"
    sparse_kind = "topk"


class VanillaCachedSample(VanillaCached):
    name = "vanilla-cached-sample"
    sparse_kind = "sample"


CACHED = {cls.name: cls for cls in (VanillaCachedTopK, VanillaCachedSample)}
