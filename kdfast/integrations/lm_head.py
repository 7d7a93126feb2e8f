"""The LM head of a Hugging Face model as (transform, weight, bias, softcap, logit scale), and the states it reads.

``u = head_states(model, head, inputs) @ head.weight.T + head.bias``: the pre-decoder states come from
the base model plus the head's transform, so the fused losses read them without logits. The model's
logits are ``softcap * tanh(u * logit_scale / softcap)`` (or ``u * logit_scale`` without a cap), from
its config: Gemma 2's ``final_logit_softcapping``, Cohere's ``logit_scale`` (multiplies), Granite's
``logits_scaling`` (divides).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from kdfast.models import mlm_head


@dataclass
class LMHead:
    """``transform`` maps the base model's last hidden state [B, L, H] to the decoder input;
    ``weight`` [V, H] and ``bias`` [V] (or None) are the decoder's; ``softcap`` (None = no tanh) and
    ``logit_scale`` map the decoder's output to the model's logits."""

    transform: Callable[[torch.Tensor], torch.Tensor]
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float] = None
    logit_scale: float = 1.0

    @property
    def vocab_size(self) -> int:
        return full_shape(self.weight)[0]


def full_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """A parameter's shape; for one DeepSpeed ZeRO-3 partitions (an empty tensor outside its module's
    forward), the shape it has when gathered."""
    return tuple(getattr(weight, "ds_shape", weight.shape))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _config_number(config: object, field: str, who: str) -> Optional[float]:
    """``config.field`` as a float, None when absent or None; a clear error for anything else."""
    value = getattr(config, field, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{who}: expected config.{field} to be None or a finite number > 0, got {value!r}")
    return float(value)


def logit_map(model: nn.Module, who: str) -> tuple[Optional[float], float]:
    """(softcap, logit_scale) of ``model``'s logits from its config: ``final_logit_softcapping`` (Gemma 2, the
    cap), ``logit_scale`` (Cohere, multiplies) and ``logits_scaling`` (Granite, divides)."""
    config = getattr(model, "config", None)
    softcap = _config_number(config, "final_logit_softcapping", who)
    scale = 1.0
    multiplier = _config_number(config, "logit_scale", who)
    divisor = _config_number(config, "logits_scaling", who)
    if multiplier is not None:
        scale *= multiplier
    if divisor is not None:
        scale /= divisor
    return softcap, scale


def find_lm_head(model: nn.Module, who: str) -> LMHead:
    """The head of a BERT/RoBERTa masked LM (transform before the decoder) or of a causal LM whose
    output embeddings read the base model's last hidden state directly (Llama, GPT-2, ...).
    Tied or untied, the decoder's own weight is returned, so gradients reach the shared tensor."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: expected a transformers PreTrainedModel (nn.Module), got {type(model).__name__}")
    get = getattr(model, "get_output_embeddings", None)
    decoder = get() if callable(get) else None
    weight = getattr(decoder, "weight", None)
    if not isinstance(weight, torch.Tensor) or len(full_shape(weight)) != 2:
        raise TypeError(f"{who}: expected a model with an LM head (get_output_embeddings() returning a layer with a "
                        f"[V, H] weight), got {type(model).__name__} whose get_output_embeddings() gives "
                        f"{type(decoder).__name__}; use an *ForMaskedLM or *ForCausalLM model")
    softcap, scale = logit_map(model, who)
    if any(child is decoder for child in model.children()):
        return LMHead(_identity, weight, getattr(decoder, "bias", None), softcap, scale)
    try:
        transform, known_decoder = mlm_head(model)
    except TypeError:
        known_decoder = None
    if known_decoder is not decoder:
        raise TypeError(f"{who}: expected a BERT/RoBERTa masked LM or a causal LM whose LM head is a direct child "
                        f"layer, got {type(model).__name__}, whose head kdfast does not know how to split into "
                        f"transform and decoder")
    return LMHead(transform, weight, decoder.bias, softcap, scale)


def is_causal_lm(model: nn.Module) -> bool:
    """True for models trained on next-token labels (Llama, GPT-2, BertLMHeadModel, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update((value,) if isinstance(value, str) else value)
    return getattr(model, "loss_type", None) == "ForCausalLM" or type(model).__name__ in names


def head_states(model: nn.Module, head: LMHead, inputs: dict) -> torch.Tensor:
    """Decoder inputs [B, L, H] for ``inputs`` (the model's keyword inputs; ``labels`` ignored):
    the base model's last hidden state through ``head.transform``. No logits are computed."""
    base = model.base_model
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    if "use_cache" in inspect.signature(base.forward).parameters:
        kwargs["use_cache"] = False
    return head.transform(base(**kwargs)[0])
