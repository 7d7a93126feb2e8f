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
from kdfast.integrations.wrapped import (
    check_fsdp_layout,
    check_zero3_hooks,
    gathered,
    gathered_head,
    reshard,
    run_as_forward,
    run_as_head_forward,
    unwrap,
)
from kdfast.losses.vocab import fused_linear_kd

IGNORE_INDEX = -100


class DistillationOutput(NamedTuple):
    """``loss = kd_weight * kd + ce_weight * ce``; ``kd`` and ``ce`` are sums over the labelled
    tokens divided by ``num_items`` (``num_items_in_batch``, else this batch's labelled tokens)."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    num_items: int


def check_model(model: nn.Module, who: str) -> LMHead:
    """The LM head of ``model`` (``who``: "student" or "teacher"), after checking its weights are real."""
    head = find_lm_head(model, who)
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(f"{who}: expected weights on a real device, got parameter {meta!r} on the meta device; "
                         f"load the {who} with its weights (from_pretrained, or to_empty() then load_state_dict)")
    return head


def check_models(student: nn.Module, teacher: nn.Module) -> tuple[LMHead, LMHead]:
    """Both LM heads, after checking the pair can be distilled token by token."""
    heads = check_model(student, "student"), check_model(teacher, "teacher")
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


def count_targets(batches: list, causal: bool) -> torch.Tensor:
    """HF's ``num_items_in_batch`` for a custom loop: the targets (labels != -100; ``labels[:, 1:]`` for
    causal LMs) of this rank's accumulated micro-batches, summed over all ranks when a process group is up."""
    count = sum((target_labels(batch, causal) != IGNORE_INDEX).sum() for batch in batches)
    count = torch.as_tensor(count)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
    return count


def _rows(states: torch.Tensor, positions: torch.Tensor, causal: bool) -> torch.Tensor:
    """The [N, H] states at ``positions`` (flat indices into the [B, L'] targets)."""
    if causal:
        states = states[:, :-1]
    return states.reshape(-1, states.shape[-1])[positions.to(states.device)]


def target_rows(teacher_targets: object, targets: torch.Tensor, positions: torch.Tensor,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse targets (ids, weights) of the labelled rows, from per-position pairs [B, L', K] aligned
    with ``targets`` [B, L'] (what a causal teacher cache serves) or per-row pairs [N, K]."""
    if not (isinstance(teacher_targets, (tuple, list)) and len(teacher_targets) == 2
            and all(isinstance(t, torch.Tensor) for t in teacher_targets)):
        raise TypeError(f"teacher_targets: expected a pair of tensors (ids, weights), got "
                        f"{type(teacher_targets).__name__}")
    ids, weights = teacher_targets
    if ids.shape != weights.shape:
        raise ValueError(f"teacher_targets: expected ids and weights of one shape, got {tuple(ids.shape)} and "
                         f"{tuple(weights.shape)}")
    if ids.dim() == 3 and tuple(ids.shape[:2]) == tuple(targets.shape):
        index = positions.to(ids.device)
        ids, weights = ids.reshape(-1, ids.shape[2])[index], weights.reshape(-1, ids.shape[2])[index]
    elif not (ids.dim() == 2 and ids.shape[0] == positions.numel()):
        raise ValueError(f"teacher_targets: expected (ids, weights) of shape [B, L', K] with [B, L'] = "
                         f"{tuple(targets.shape)} (one row per target position) or [N={positions.numel()}, K] (one "
                         f"per labelled target), got {tuple(ids.shape)}")
    return ids.to(device), weights.to(device)


def _common_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Autocast's dtype when it is on for this device, else the head weight's."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return weight.dtype


def teacher_rows(teacher: nn.Module, head: LMHead, inputs: dict, positions: torch.Tensor, causal: bool,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Teacher (hidden [N, Ht], weight [V, Ht], bias) at ``positions``, computed without autograd on
    the teacher's device (that of its input embeddings) and moved to ``device``, in the teacher's dtype.
    The states come from the teacher's own forward (an FSDP2-sharded teacher gathers its layers there and
    is resharded after; so does a ZeRO-3 teacher, passed as its engine or its module); a sharded head is gathered."""
    caller, teacher = unwrap(teacher)
    teacher_device = teacher.get_input_embeddings().weight.device
    moved = {k: v.to(teacher_device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    teacher.eval()
    with torch.no_grad():
        hidden = run_as_forward(caller, teacher, lambda **batch: _rows(head_states(teacher, head, batch), positions,
                                                                        causal), moved)
        reshard(teacher)
        weight, bias = gathered(head.weight), None if head.bias is None else gathered(head.bias)
    dtype = weight.dtype
    bias = None if bias is None else bias.to(device, dtype)
    return hidden.to(device, dtype), weight.to(device), bias


def _check_pair(student: nn.Module, teacher: Optional[nn.Module], teacher_targets: Optional[tuple],
                teacher_topk: Optional[int]) -> tuple:
    """The student's (wrapper, model, head) and the teacher's head (None beside sparse targets) after checking
    the models can be distilled: real weights, a shared vocabulary, a supported FSDP layout, and under ZeRO-3
    the engine's hooks."""
    caller, model = unwrap(student) if isinstance(student, nn.Module) else (student, student)
    teacher_model = unwrap(teacher)[1] if isinstance(teacher, nn.Module) else teacher
    teacher_head = None
    if teacher_targets is None:
        student_head, teacher_head = check_models(model, teacher_model)
        check_fsdp_layout(teacher_model, "teacher")
        check_zero3_hooks(teacher_model, "teacher")
    elif teacher is not None or teacher_topk is not None:
        raise ValueError(f"teacher_targets: expected alone, with teacher=None and teacher_topk=None (sparse targets "
                         f"replace the teacher), got teacher={type(teacher).__name__}, teacher_topk={teacher_topk}")
    else:
        student_head = check_model(model, "student")
    check_fsdp_layout(model, "student")
    check_zero3_hooks(model, "student")
    return caller, model, student_head, teacher_head


def _teacher_args(teacher: nn.Module, head, inputs: dict, positions: torch.Tensor, causal: bool,
                  device: torch.device, teacher_topk: Optional[int]) -> dict:
    """The teacher's keyword arguments of :func:`kdfast.fused_linear_kd`: its states and ``head`` at
    ``positions`` (``teacher_rows``), its logit map and ``teacher_topk``."""
    rows = teacher_rows(teacher, head, inputs, positions, causal, device)
    return dict(zip(("teacher_hidden", "teacher_weight", "teacher_bias"), rows), teacher_topk=teacher_topk,
                teacher_softcap=head.softcap, teacher_logit_scale=head.logit_scale)


def distillation_loss(student: nn.Module, teacher: Optional[nn.Module], inputs: dict, temperature: float = 1.0,
                      kd_weight: float = 1.0, ce_weight: float = 1.0, kind: str = "kl",
                      beta: Optional[float] = None, teacher_topk: Optional[int] = None,
                      num_items_in_batch: Union[int, torch.Tensor, None] = None, causal: Optional[bool] = None,
                      backend: str = "auto", teacher_targets: Optional[tuple] = None) -> DistillationOutput:
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

    ``teacher_targets=(ids, weights)`` (with ``teacher=None``) replaces the teacher by sparse targets,
    e.g. from a teacher cache (``kdfast.cache.causal.CausalTeacherCache.targets``): [B, L', K] per
    target position (L' = L - 1 for causal LMs; rows of unlabelled positions are skipped) or [N, K] per
    labelled target; ids -1 are padding. See :func:`kdfast.fused_linear_kd` for the loss on them
    (``kind`` "kl" or "soft_ce").

    ``student`` may be wrapped in ``DistributedDataParallel``, sharded by FSDP2's ``fully_shard``
    (applied to the whole model) or be a DeepSpeed ZeRO-3 engine, ``teacher`` replicated or sharded
    (FSDP2 or a ZeRO-3 engine): the loss runs as the student's forward, through the wrapper, and under
    ZeRO-3 the fused op as the LM head's forward. Across ranks, pass the count summed over all ranks and
    multiply the loss by the world size, since DDP, FSDP and DeepSpeed average gradients over ranks (as
    HF Trainer does); with DeepSpeed call ``engine.backward(loss, scale_wrt_gas=False)``.
    """
    # Over 60 lines for its docstring (the public contract); the body is about 30.
    check_options(temperature, kd_weight, ce_weight, kind, backend)
    caller, model, student_head, teacher_head = _check_pair(student, teacher, teacher_targets, teacher_topk)
    count = check_num_items(num_items_in_batch)
    causal = is_causal_lm(model) if causal is None else causal
    targets = target_labels(inputs, causal)
    flat = targets.reshape(-1)
    positions = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    device = model.get_input_embeddings().weight.device
    if teacher_targets is None:
        teacher_args = _teacher_args(teacher, teacher_head, inputs, positions, causal, device, teacher_topk)
    else:
        teacher_args = dict(teacher_targets=target_rows(teacher_targets, targets, positions, device))
    extra = {} if beta is None else {"beta": beta}

    def fused_op(hidden_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        head = gathered_head(model, "student")  # inside the forward, after the base model: gathered by FSDP2
        dtype = _common_dtype(hidden_s, head.weight)
        bias_s = None if head.bias is None else head.bias.to(dtype)
        out = fused_linear_kd(hidden_s.to(dtype), head.weight.to(dtype), student_bias=bias_s,
                              labels=flat[positions].to(hidden_s.device), temperature=temperature,
                              kd_weight=kd_weight, mlm_weight=ce_weight, kind=kind, reduction="sum", backend=backend,
                              student_softcap=head.softcap, student_logit_scale=head.logit_scale,
                              **teacher_args, **extra)
        return out.loss, out.kd, out.mlm

    def fused_loss(**batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Only the head's transform is used here: under ZeRO-3 the engine's forward would gather a weight read
        # outside its module (and hold it through the backward); the op reads it in the head's own forward.
        states = head_states(model, student_head, batch)
        return run_as_head_forward(model, fused_op, _rows(states, positions, causal))

    loss, kd, ce = run_as_forward(caller, model, fused_loss, inputs)
    divisor = count.to(loss.device) if count is not None else max(positions.numel(), 1)
    return DistillationOutput(loss / divisor, kd / divisor, ce / divisor,
                              int(count) if count is not None else positions.numel())
