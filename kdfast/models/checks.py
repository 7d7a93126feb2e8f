"""Agreement checks between teacher, student, tokenizer and batch; each error names the fix."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdfast.models.forward import base_model
from kdfast.models.taps import ModelTaps

BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def check_vocab(teacher: nn.Module, student: nn.Module) -> None:
    """Same vocabulary size and padding id: distillation compares token by token."""
    t_cfg, s_cfg = base_model(teacher).config, base_model(student).config
    if t_cfg.vocab_size != s_cfg.vocab_size:
        raise ValueError(f"student: expected the teacher's vocabulary (vocab_size={t_cfg.vocab_size}), got "
                         f"vocab_size={s_cfg.vocab_size}; build the student with build_student(..., teacher=teacher) "
                         f"and tokenize with the teacher's tokenizer")
    if t_cfg.pad_token_id != s_cfg.pad_token_id:
        raise ValueError(f"student: expected the teacher's pad_token_id={t_cfg.pad_token_id}, got "
                         f"{s_cfg.pad_token_id}; teacher and student must share one tokenizer (build the student "
                         f"with build_student(..., teacher=teacher))")


def check_tokenizer(tokenizer, model: nn.Module, who: str = "teacher") -> None:
    """The tokenizer's vocabulary and padding id match ``model``'s config."""
    config = base_model(model).config
    size = len(tokenizer)
    if size != config.vocab_size:
        raise ValueError(f"tokenizer: expected {config.vocab_size} tokens (the {who}'s vocab_size), got {size}; "
                         f"tokenize with the {who}'s own tokenizer (AutoTokenizer.from_pretrained(<{who} path>))")
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None and config.pad_token_id is not None and pad != config.pad_token_id:
        raise ValueError(f"tokenizer: expected pad_token_id={config.pad_token_id} (the {who}'s), got {pad}; "
                         f"tokenize with the {who}'s own tokenizer")


def check_batch(batch: dict, *models: tuple[str, nn.Module]) -> dict:
    """A batch dict of [B, L] tensors valid for every (name, model); returns it with token_type_ids
    filled (zeros) when absent, so both models see the same segment ids."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ValueError(f"batch: expected a dict with input_ids [B, L] (and attention_mask, token_type_ids, "
                         f"labels), got {type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(
                             batch, dict) else ""))
    input_ids = batch["input_ids"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"batch['input_ids']: expected a [B, L] tensor, got {getattr(input_ids, 'shape', input_ids)}")
    for key in BATCH_KEYS[1:]:
        value = batch.get(key)
        if value is not None and tuple(value.shape) != tuple(input_ids.shape):
            raise ValueError(f"batch[{key!r}]: expected shape {tuple(input_ids.shape)} like input_ids, "
                             f"got {tuple(value.shape)}")
    batch = dict(batch)
    if batch.get("token_type_ids") is None:
        batch["token_type_ids"] = torch.zeros_like(input_ids)
    if torch.compiler.is_compiling():  # the id checks read the device; eager calls make them
        return batch
    top_id, top_type = int(input_ids.max()), int(batch["token_type_ids"].max())
    for name, model in models:
        config = base_model(model).config
        if top_id >= config.vocab_size:
            raise ValueError(f"batch['input_ids']: expected ids < {config.vocab_size} (the {name}'s vocab_size), "
                             f"got id {top_id}; tokenize with the teacher's tokenizer")
        if top_type >= config.type_vocab_size:
            raise ValueError(f"batch['token_type_ids']: expected ids < {config.type_vocab_size} (the {name}'s "
                             f"type_vocab_size), got {top_type}; give both models the same type_vocab_size "
                             f"(build_student(..., teacher=teacher)) or pass token_type_ids within range")
    return batch


def check_same_inputs(taps: Optional[ModelTaps], batch: dict) -> None:
    """The teacher taps were computed on this batch's (masked) inputs."""
    if taps is None:
        return
    ids = batch["input_ids"]
    same = taps.input_ids is ids or (taps.input_ids.shape == ids.shape and torch.equal(taps.input_ids, ids))
    if not same:
        raise ValueError("taps: expected teacher taps computed on this batch's masked input_ids, got taps from "
                         "different inputs; call teacher_pass(batch) and student_pass(batch, taps) with the "
                         "same batch (mask once, feed both)")
