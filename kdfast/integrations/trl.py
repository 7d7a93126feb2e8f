"""On-policy distillation in TRL with kdfast's fused loss: no [B, L, V] logits for either model.

``KDFastGKDTrainer`` is TRL's ``GKDTrainer`` (``trl.experimental.gkd``): the student's own
generations (``lmbda``), sequence KD (``seq_kd``) and the rest of TRL's loop run unchanged; only the
loss, TRL's ``generalized_jsd_loss`` on full logits, becomes :func:`generalized_jsd_loss` on the
models' pre-decoder states and LM heads. ``KDFastDistillationTrainer`` does the same for TRL's
``DistillationTrainer`` (always on-policy; its loss already avoids full logits, kdfast's replaces it).
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn

from kdfast import _checks as check
from kdfast.integrations.loss import IGNORE_INDEX, distillation_loss

# The TRL releases whose trainers these classes were tested against (pyproject's ``trl`` extra).
TESTED_TRL = ">=1.16,<1.17"

try:
    import trl
except ImportError as error:
    raise ImportError(f"trl: expected TRL installed for kdfast.integrations.trl (pip install 'kdfast[trl]' "
                      f"installs trl{TESTED_TRL}), got {error}") from error


def check_trl_version(version: Optional[str] = None) -> bool:
    """Warn when the installed TRL (or ``version``) is outside :data:`TESTED_TRL`; True when inside."""
    version = trl.__version__ if version is None else version
    if Version(version) in SpecifierSet(TESTED_TRL):
        return True
    warnings.warn(f"trl: kdfast.integrations.trl was tested with trl{TESTED_TRL}, got trl {version}; the trainers "
                  f"override TRL's loss methods, which may have changed (pip install 'kdfast[trl]' pins the range)",
                  UserWarning, stacklevel=2)
    return False


check_trl_version()

try:
    from trl import DistillationTrainer as _TRLDistillationTrainer
    from trl.experimental.gkd import GKDTrainer as _TRLGKDTrainer
except ImportError as error:
    raise ImportError(f"trl: expected trl.DistillationTrainer and trl.experimental.gkd.GKDTrainer (trl{TESTED_TRL}), "
                      f"got trl {trl.__version__} without them: {error}") from error


def trl_divergence(beta: float) -> dict:
    """TRL's β (0 = forward KL(teacher || student), 1 = reverse KL, else the generalised JSD with
    mixture β·teacher + (1 - β)·student) as :func:`kdfast.fused_linear_kd`'s ``kind`` and ``beta``."""
    beta = check.unit_interval("beta", beta)
    if beta == 0.0:
        return {"kind": "kl"}
    if beta == 1.0:
        return {"kind": "reverse_kl"}
    return {"kind": "jsd", "beta": beta}


def generalized_jsd_loss(student: nn.Module, teacher: nn.Module, inputs: dict, beta: float = 0.5,
                         temperature: float = 1.0, num_items_in_batch: Union[int, torch.Tensor, None] = None,
                         backend: str = "auto") -> torch.Tensor:
    """TRL's ``generalized_jsd_loss`` (β and temperature in TRL's convention, no T² factor) of two
    causal LMs on ``inputs`` (``input_ids``, ``attention_mask``, ``labels`` [B, L], -100 = no target):
    positions ``:-1`` predict ``labels[:, 1:]``; the sum over target tokens is divided by
    ``num_items_in_batch`` when given, else by the number of target tokens (0 when there are none)."""
    check.positive("temperature", temperature)
    model_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "labels") if key in inputs}
    # distillation_loss scales the divergence by T² (Hinton); TRL does not.
    out = distillation_loss(student, teacher, model_inputs, temperature=temperature,
                            kd_weight=1.0 / temperature ** 2, ce_weight=0.0, num_items_in_batch=num_items_in_batch,
                            causal=True, backend=backend, **trl_divergence(beta))
    return out.loss


class KDFastGKDTrainer(_TRLGKDTrainer):
    """TRL's ``GKDTrainer`` with kdfast's fused loss. Same arguments; ``kdfast_backend`` picks the
    loss backend. As in TRL, ``temperature`` is the sampling temperature only: the divergence is at T = 1.
    One process on one device (no DDP, FSDP, DeepSpeed)."""

    def __init__(self, *args, kdfast_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.world_size > 1 or self.args.n_gpu > 1:
            raise ValueError(f"args: expected one process on one device, got world_size={self.args.world_size}, "
                             f"n_gpu={self.args.n_gpu}; the loss calls the student's base model and LM head "
                             f"directly, which would bypass DDP/DataParallel")
        self.kdfast_backend = kdfast_backend

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = self.accelerator.unwrap_model(model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        # TRL calls the accelerate-wrapped models, which autocast under bf16/fp16; the base models are not wrapped.
        with self.accelerator.autocast():
            loss = generalized_jsd_loss(student, teacher, inputs, beta=self.beta,
                                        num_items_in_batch=num_items_in_batch, backend=self.kdfast_backend)
        return (loss, {"loss": loss}) if return_outputs else loss


def completion_inputs(inputs: dict) -> dict:
    """A ``DistillationTrainer`` batch (``prompt_ids``/``prompt_mask`` [B, P], ``completion_ids``/
    ``completion_mask`` [B, C], optional ``tool_mask`` [B, C]) as ``input_ids``, ``attention_mask``
    and ``labels`` [B, P + C], the labels -100 outside the trained completion tokens."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    trained = inputs["completion_mask"] * inputs.get("tool_mask", 1)
    trained = torch.cat([torch.zeros_like(inputs["prompt_mask"]), trained], dim=1)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(trained == 0, IGNORE_INDEX)}


class KDFastDistillationTrainer(_TRLDistillationTrainer):
    """TRL's ``DistillationTrainer`` with kdfast's fused loss (β and ``temperature`` applied to the
    divergence as TRL does). Same arguments; ``kdfast_backend`` picks the loss backend. Text-only
    models with a local teacher; TRL's logged ``entropy`` becomes None (kdfast does not compute it)."""

    def __init__(self, *args, kdfast_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if self.teacher_model is None:
            raise ValueError("teacher_model: expected a local causal LM, got None")
        self.kdfast_backend = kdfast_backend

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        batch = completion_inputs(inputs)
        loss = generalized_jsd_loss(unwrapped_student, teacher, batch, beta=self.beta, temperature=self.temperature,
                                    num_items_in_batch=num_items_in_batch, backend=self.kdfast_backend)
        n_valid = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return loss, torch.full((), float("nan"), device=loss.device), n_valid


__all__ = ["KDFastGKDTrainer", "KDFastDistillationTrainer", "generalized_jsd_loss", "completion_inputs",
           "trl_divergence", "check_trl_version", "TESTED_TRL"]
