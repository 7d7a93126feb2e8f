"""The LM head of a Hugging Face model as (transform, weight, bias), and the states it reads.

``logits = head_states(model, head, inputs) @ head.weight.T + head.bias``: the pre-decoder states
come from the base model plus the head's transform, so the fused losses read them without logits.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from kdfast.models import mlm_head

# Config fields that rescale logits after the decoder (Gemma 2, Cohere, Granite): the fused
# losses would distil other logits than the model's, so such models are refused.
LOGIT_RESCALING_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class LMHead:
    """``transform`` maps the base model's last hidden state [B, L, H] to the decoder input;
    ``weight`` [V, H] and ``bias`` [V] (or None) are the decoder's."""

    transform: Callable[[torch.Tensor], torch.Tensor]
    weight: torch.Tensor
    bias: Optional[torch.Tensor]

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def find_lm_head(model: nn.Module, who: str) -> LMHead:
    """The head of a BERT/RoBERTa masked LM (transform before the decoder) or of a causal LM whose
    output embeddings read the base model's last hidden state directly (Llama, GPT-2, ...).
    Tied or untied, the decoder's own weight is returned, so gradients reach the shared tensor."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: expected a transformers PreTrainedModel (nn.Module), got {type(model).__name__}")
    get = getattr(model, "get_output_embeddings", None)
    decoder = get() if callable(get) else None
    weight = getattr(decoder, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"{who}: expected a model with an LM head (get_output_embeddings() returning a layer with a "
                        f"[V, H] weight), got {type(model).__name__} whose get_output_embeddings() gives "
                        f"{type(decoder).__name__}; use an *ForMaskedLM or *ForCausalLM model")
    config = getattr(model, "config", None)
    for field in LOGIT_RESCALING_FIELDS:
        if getattr(config, field, None) not in (None, 1, 1.0):
            raise ValueError(f"{who}: expected logits = decoder(hidden), got a model whose config sets {field}="
                             f"{getattr(config, field)!r} (logits rescaled after the decoder), which the fused loss "
                             f"does not reproduce")
    if any(child is decoder for child in model.children()):
        return LMHead(_identity, weight, getattr(decoder, "bias", None))
    try:
        transform, known_decoder = mlm_head(model)
    except TypeError:
        known_decoder = None
    if known_decoder is not decoder:
        raise TypeError(f"{who}: expected a BERT/RoBERTa masked LM or a causal LM whose LM head is a direct child "
                        f"layer, got {type(model).__name__}, whose head kdfast does not know how to split into "
                        f"transform and decoder")
    return LMHead(transform, weight, decoder.bias)


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
