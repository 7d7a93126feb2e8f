"""Vocabulary KD between two Hugging Face LMs on one batch, for any training loop.

The student's and teacher's pre-decoder states of the labelled positions go with both LM heads to
:func:`kdfast.fused_linear_kd`: [N, V] logits never exist on the kernel backends.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from kdfast import _backends
from kdfast import _checks as check
from kdfast._reduction import KINDS
from kdfast.integrations.lm_head import LMHead, find_lm_head, head_states, is_causal_lm
from kdfast.losses.vocab import fused_linear_kd

IGNORE_INDEX = -100


class DistillationOutput(NamedTuple):
    """``loss = kd_weight * kd + ce_weight * ce``; ``kd`` and ``ce`` are sums over the labelled
    tokens divided by ``num_items`` (``num_items_in_batch``, else this batch's labelled tokens)."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    num_items: int


def check_models(student: nn.Module, teacher: nn.Module) -> tuple[LMHead, LMHead]:
    """Both LM heads, after checking the pair can be distilled token by token."""
    heads = find_lm_head(student, "student"), find_lm_head(teacher, "teacher")
    for who, model in (("student", student), ("teacher", teacher)):
        meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
        if meta is not None:
            raise ValueError(f"{who}: expected weights on a real device, got parameter {meta!r} on the meta device; "
                             f"load the {who} with its weights (from_pretrained, or to_empty() then load_state_dict)")
    vocab_s, vocab_t = heads[0].vocab_size, heads[1].vocab_size
    if vocab_s != vocab_t:
        raise ValueError(f"teacher: expected the student's vocabulary size V={vocab_s} (its LM head rows), got "
                         f"V={vocab_t}; teacher and student must share one tokenizer and vocabulary")
    return heads


def check_options(temperature: float, kd_weight: float, ce_weight: float, kind: str, backend: str) -> None:
    """The loss options, checked before any forward pass."""
    check.positive("temperature", temperature)
    check.non_negative("kd_weight", kd_weight)
    check.non_negative("ce_weight", ce_weight)
    check.choice("kind", kind, KINDS)
    check.choice("backend", backend, ("auto",) + _backends.BACKENDS)


def check_num_items(num_items_in_batch: Union[int, torch.Tensor, None]) -> Optional[torch.Tensor]:
    """None, or a positive count (int or 0-dim tensor) as a tensor."""
    if num_items_in_batch is None:
        return None
    count = torch.as_tensor(num_items_in_batch)
    if count.numel() != 1 or count.dtype == torch.bool:
        raise TypeError(f"num_items_in_batch: expected None or a count (int or 0-dim tensor), got "
                        f"{type(num_items_in_batch).__name__} of shape {tuple(count.shape)}")
    if not count.item() > 0:
        raise ValueError(f"num_items_in_batch: expected a count > 0 (label tokens over the accumulated "
                         f"micro-batches), got {count.item()}")
    return count.reshape(())


def target_labels(inputs: dict, causal: bool) -> torch.Tensor:
    """Per-position targets [B, L'] aligned with the states that predict them (-100 = none):
    causal LMs predict labels[:, 1:] from positions :-1; padded targets (attention_mask 0) are dropped."""
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs: expected a dict of the models' keyword inputs with labels, got "
                        f"{type(inputs).__name__}")
    labels = inputs.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"inputs['labels']: expected a [B, L] tensor of token ids (-100 = not a target), got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    mask = inputs.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    return labels[:, 1:] if causal else labels


def _rows(states: torch.Tensor, positions: torch.Tensor, causal: bool) -> torch.Tensor:
    """The [N, H] states at ``positions`` (flat indices into the [B, L'] targets)."""
    if causal:
        states = states[:, :-1]
    return states.reshape(-1, states.shape[-1])[positions.to(states.device)]


def _common_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Autocast's dtype when it is on for this device, else the head weight's."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return weight.dtype


def teacher_rows(teacher: nn.Module, head: LMHead, inputs: dict, positions: torch.Tensor, causal: bool,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Teacher (hidden [N, Ht], weight [V, Ht], bias) at ``positions``, computed without autograd on
    the teacher's device (that of its input embeddings) and moved to ``device``, in the teacher's dtype."""
    teacher_device = teacher.get_input_embeddings().weight.device
    moved = {k: v.to(teacher_device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    teacher.eval()
    with torch.no_grad():
        hidden = _rows(head_states(teacher, head, moved), positions, causal)
    dtype = head.weight.dtype
    bias = None if head.bias is None else head.bias.detach().to(device, dtype)
    return hidden.to(device, dtype), head.weight.detach().to(device), bias


def distillation_loss(student: nn.Module, teacher: nn.Module, inputs: dict, temperature: float = 1.0,
                      kd_weight: float = 1.0, ce_weight: float = 1.0, kind: str = "kl",
                      beta: Optional[float] = None, teacher_topk: Optional[int] = None,
                      num_items_in_batch: Union[int, torch.Tensor, None] = None, causal: Optional[bool] = None,
                      backend: str = "auto") -> DistillationOutput:
    """``kd_weight * T² * KL(teacher || student at T)`` (``kind="kl"``; or ``"soft_ce"``, and
    whatever further kinds :func:`kdfast.fused_linear_kd` accepts, with ``beta``) plus
    ``ce_weight * CE(student, labels)``, over the labelled tokens of ``inputs``.

    ``inputs``: the models' keyword inputs ([B, L] ``input_ids``, ``attention_mask``, ...) with
    ``labels`` [B, L] (-100 = not a target). Masked LMs distil at labelled positions; causal LMs
    (``causal`` None = detect) predict ``labels[:, 1:]`` from positions ``:-1``. Padded targets are
    excluded. Each term is a sum over tokens divided by ``num_items_in_batch`` (HF's count over all
    accumulated micro-batches: the gradient equals that of one large batch), else by this batch's
    labelled tokens (a mean). The teacher runs in eval mode under ``torch.no_grad`` on its own device
    and dtype; its states and head move to the student's device.
    """
    check_options(temperature, kd_weight, ce_weight, kind, backend)
    student_head, teacher_head = check_models(student, teacher)
    count = check_num_items(num_items_in_batch)
    causal = is_causal_lm(student) if causal is None else causal
    targets = target_labels(inputs, causal)
    flat = targets.reshape(-1)
    positions = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    hidden_s = _rows(head_states(student, student_head, inputs), positions, causal)
    dtype = _common_dtype(hidden_s, student_head.weight)
    weight_s = student_head.weight.to(dtype)
    bias_s = None if student_head.bias is None else student_head.bias.to(dtype)
    hidden_t, weight_t, bias_t = teacher_rows(teacher, teacher_head, inputs, positions, causal, hidden_s.device)
    extra = {} if beta is None else {"beta": beta}
    out = fused_linear_kd(hidden_s.to(dtype), weight_s, hidden_t, weight_t, bias_s, bias_t,
                          labels=flat[positions].to(hidden_s.device), temperature=temperature, kd_weight=kd_weight,
                          mlm_weight=ce_weight, kind=kind, reduction="sum", teacher_topk=teacher_topk,
                          backend=backend, student_softcap=student_head.softcap,
                          student_logit_scale=student_head.logit_scale, teacher_softcap=teacher_head.softcap,
                          teacher_logit_scale=teacher_head.logit_scale, **extra)
    divisor = count.to(out.loss.device) if count is not None else max(positions.numel(), 1)
    return DistillationOutput(out.loss / divisor, out.kd / divisor, out.mlm / divisor,
                              int(count) if count is not None else positions.numel())
