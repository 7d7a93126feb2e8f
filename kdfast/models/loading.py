"""Load a frozen teacher masked LM and build a student (presets, random or teacher-layer init).

Teacher and student are plain HF masked-LM models (``BertForMaskedLM``, ``RobertaForMaskedLM``),
so ``save_pretrained``/``from_pretrained`` and HF fine-tuning work on them unchanged;
:func:`kdfast.models.forward.tapped_forward` runs them with taps.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from torch import nn
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM, PretrainedConfig

from kdfast.models.checks import check_tokenizer, check_vocab
from kdfast.models.forward import base_model

#: Student shapes: (layers, hidden, heads, intermediate). The study's students are 6L-768 (with a
#: BERT-base teacher) and 12L-1024 (with BERT-large); tiny/small are for CPU runs and tests.
PRESETS = {
    "6L-768": (6, 768, 12, 3072),
    "12L-1024": (12, 1024, 16, 4096),
    "small": (4, 256, 4, 1024),
    "tiny": (2, 64, 2, 256),
}
#: Config fields a student inherits from its teacher (vocabulary, positions, token types, norms).
INHERITED = ("vocab_size", "max_position_embeddings", "type_vocab_size", "pad_token_id", "layer_norm_eps",
             "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range")
INITS = ("random", "teacher_layers")


def _device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("dtype: expected torch.float32 or torch.bfloat16 for a teacher on CPU (CPU fp16 matmuls "
                         "are slow or missing), got torch.float16; pass dtype=torch.float32 (or bfloat16), or "
                         "device='cuda'")
    return device, dtype


def _warn_new_head(name_or_path: str, missing: list) -> None:
    head = sorted(k for k in missing if k.startswith(("cls.", "lm_head.")))
    others = sorted(k for k in missing if not k.startswith(("cls.", "lm_head.")))
    if others:
        raise ValueError(f"name_or_path: expected a checkpoint holding the whole encoder, got {name_or_path!r} "
                         f"missing {len(others)} encoder weights (first: {others[:3]}); point to a full BERT/"
                         f"RoBERTa checkpoint")
    if head:
        warnings.warn(f"kdfast: {name_or_path!r} has no MLM head: the encoder is loaded, but the head "
                      f"({', '.join(head)}) is NEW (randomly initialised). Its logits are meaningless, so use a "
                      f"strategy that reads attention/hidden states (tinybert, minilm, minilm_v2), or train the "
                      f"head before vocabulary KD (vanilla, distilbert)", UserWarning, stacklevel=3)


def freeze(model: nn.Module) -> nn.Module:
    """eval mode and no gradients for every parameter (a teacher)."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_teacher(name_or_path: Union[str, nn.Module], dtype: Optional[torch.dtype] = None,
                 device: Union[str, torch.device, None] = None, compile: bool = False) -> nn.Module:
    """A frozen HF masked LM (hub name or local dir, BERT or RoBERTa; an in-memory model is accepted).

    Eval mode, no grads, on ``device`` (default: CUDA if present), in ``dtype`` (default bf16 on
    CUDA, fp32 on CPU; fp16 on CPU is refused). A checkpoint without an MLM head loads its encoder
    and warns that the head is new. ``compile=True`` marks it for ``torch.compile`` of its tapped
    forward (``kdfast.models.forward.tapped_forward``).
    """
    device, dtype = _device_dtype(device, dtype)
    if isinstance(name_or_path, nn.Module):
        model = name_or_path
    elif isinstance(name_or_path, str):
        model, info = AutoModelForMaskedLM.from_pretrained(name_or_path, output_loading_info=True)
        _warn_new_head(name_or_path, list(info.get("missing_keys", [])))
    else:
        raise TypeError(f"name_or_path: expected a hub name, a local directory or an HF model, "
                        f"got {type(name_or_path).__name__}")
    base_model(model)
    model = freeze(model.to(device=device, dtype=dtype))
    model.kdfast_compile = bool(compile)
    return model


def _student_config(preset_or_config, teacher_config: Optional[PretrainedConfig], vocab_size: Optional[int],
                    overrides: dict) -> BertConfig:
    if isinstance(preset_or_config, PretrainedConfig):
        config = preset_or_config.__class__.from_dict(preset_or_config.to_dict())
    elif isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(f"preset_or_config: expected one of {', '.join(map(repr, PRESETS))} or a BertConfig, "
                             f"got {preset_or_config!r}")
        layers, hidden, heads, intermediate = PRESETS[preset_or_config]
        inherited = {key: getattr(teacher_config, key) for key in INHERITED
                     if teacher_config is not None and hasattr(teacher_config, key)}
        if vocab_size is not None:
            inherited["vocab_size"] = vocab_size
        if "vocab_size" not in inherited:
            raise ValueError("teacher/tokenizer: expected a teacher or a tokenizer to take the vocabulary from, "
                             "got neither; pass teacher=... or tokenizer=...")
        config = BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                            intermediate_size=intermediate, **inherited)
    else:
        raise TypeError(f"preset_or_config: expected a preset name or a transformers config, "
                        f"got {type(preset_or_config).__name__}")
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"{key}: expected a field of {type(config).__name__}, got an unknown name")
        setattr(config, key, value)
    return config


def copy_teacher_layers(student: nn.Module, teacher: nn.Module) -> list[int]:
    """DistilBERT-style init: embeddings, MLM head and student layer i <- teacher layer i*k
    (k = teacher layers // student layers). Widths must match. Returns the teacher layers used."""
    s_base, t_base = base_model(student), base_model(teacher)
    s_cfg, t_cfg = s_base.config, t_base.config
    for key in ("hidden_size", "num_attention_heads", "intermediate_size"):
        if getattr(s_cfg, key) != getattr(t_cfg, key):
            raise ValueError(f"init: expected a student whose {key} equals the teacher's ({getattr(t_cfg, key)}) "
                             f"for init='teacher_layers', got {getattr(s_cfg, key)}; use init='random' or a "
                             f"preset as wide as the teacher")
    n_s, n_t = len(s_base.encoder.layer), len(t_base.encoder.layer)
    if n_s > n_t:
        raise ValueError(f"init: expected a student with at most the teacher's {n_t} layers for "
                         f"init='teacher_layers', got {n_s}")
    k = n_t // n_s
    chosen = [i * k for i in range(n_s)]
    with torch.no_grad():
        s_base.embeddings.load_state_dict(t_base.embeddings.state_dict())
        for i, j in enumerate(chosen):
            s_base.encoder.layer[i].load_state_dict(t_base.encoder.layer[j].state_dict())
        student_head = getattr(student, "cls", None)
        teacher_head = getattr(teacher, "cls", None)
        if student_head is not None and teacher_head is not None:
            student_head.load_state_dict(teacher_head.state_dict())
    return chosen


def build_student(preset_or_config: Union[str, PretrainedConfig], teacher: Optional[nn.Module] = None,
                  tokenizer=None, init: str = "random", device: Union[str, torch.device, None] = None,
                  **config_overrides) -> BertForMaskedLM:
    """A trainable fp32 ``BertForMaskedLM`` student.

    ``preset_or_config``: a name in :data:`PRESETS` (vocabulary, positions, token types and
    dropout come from ``teacher``'s config, or the vocabulary from ``tokenizer``) or a config.
    ``init="teacher_layers"`` copies every k-th teacher layer (needs equal widths).
    ``config_overrides`` set config fields (e.g. ``attention_probs_dropout_prob=0.0``).
    Placed on ``device`` (default: the teacher's device, else CPU).
    """
    if init not in INITS:
        raise ValueError(f"init: expected one of {', '.join(map(repr, INITS))}, got {init!r}")
    teacher_config = base_model(teacher).config if teacher is not None else None
    if tokenizer is not None and teacher is not None:
        check_tokenizer(tokenizer, teacher)
    vocab_size = len(tokenizer) if tokenizer is not None else None
    config = _student_config(preset_or_config, teacher_config, vocab_size, config_overrides)
    student = BertForMaskedLM(config)
    if teacher is not None:
        check_vocab(teacher, student)
    if init == "teacher_layers":
        if teacher is None:
            raise ValueError("teacher: expected a teacher model for init='teacher_layers', got None")
        copy_teacher_layers(student, teacher)
    if device is None:
        device = next(teacher.parameters()).device if teacher is not None else "cpu"
    return student.to(device=device, dtype=torch.float32).train()
