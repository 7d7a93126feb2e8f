"""One tapped forward pass of an HF BERT/RoBERTa masked LM.

Why our own compact layer loop over the HF modules, rather than hooks on HF's forward:
- HF stays the storage: weights load with ``from_pretrained``, students save with
  ``save_pretrained`` and fine-tune with HF heads, unchanged.
- The loop runs exactly the HF layer arithmetic (same Linear/LayerNorm modules, in the same
  order) but calls :func:`kdfast.models.attention.attend`: flash-attn varlen or SDPA with a
  [B, 1, 1, L] key mask, never HF's expanded [B, 1, L, L] mask nor eager [L, L] probabilities.
- Taps are plain local tensors kept only where the plan asks: no hook registration per step,
  no outputs to filter, and q/k/v come straight from the projections (the tensors the fused
  losses read), before the attention op.
- It is short enough to read in one screen, and ``torch.compile`` traces it whole.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdfast.models.attention import attend
from kdfast.models.plan import ModelPlan
from kdfast.models.taps import ModelTaps


def base_model(model: nn.Module) -> nn.Module:
    """The encoder (``BertModel``/``RobertaModel``) inside an MLM model."""
    base = getattr(model, "base_model", model)
    if not hasattr(base, "encoder") or not hasattr(base, "embeddings"):
        raise TypeError(f"model: expected an HF BERT-style masked LM (BertForMaskedLM, RobertaForMaskedLM), "
                        f"got {type(model).__name__}")
    return base


def mlm_head(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Linear]:
    """(transform, decoder) of the MLM head: logits = decoder(transform(sequence_output))."""
    if hasattr(model, "cls"):  # BERT: cls.predictions.{transform, decoder}
        predictions = model.cls.predictions
        return predictions.transform, predictions.decoder
    if hasattr(model, "lm_head"):  # RoBERTa: lm_head.{dense, layer_norm, decoder}, GELU between
        head = model.lm_head
        return (lambda x: head.layer_norm(F.gelu(head.dense(x)))), head.decoder
    raise TypeError(f"model: expected a masked LM with an MLM head (cls or lm_head), got {type(model).__name__}")


def key_mask_of(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[B, L] bool of real tokens, or None when there is no padding (lets SDPA use its fastest path;
    under torch.compile the mask is kept: whether it has padding is a value, not a shape)."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    return None if not torch.compiler.is_compiling() and bool(mask.all()) else mask


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H] -> [B, h, L, d] view."""
    b, length, width = x.shape
    return x.view(b, length, heads, width // heads).transpose(1, 2)


def tapped_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   token_type_ids: Optional[torch.Tensor] = None,
                   plan: Optional[ModelPlan] = None) -> ModelTaps:
    """Run ``model`` on [B, L] inputs and keep what ``plan`` names (see :class:`ModelTaps`; None
    keeps nothing).

    Dropout follows ``model.training``; autograd follows the caller's grad mode.
    """
    plan = ModelPlan() if plan is None else plan
    base = base_model(model)
    config = base.config
    heads = config.num_attention_heads
    layers = base.encoder.layer
    plan.validate("model", len(layers))
    key_mask = key_mask_of(attention_mask)
    taps = ModelTaps(num_layers=len(layers), num_heads=heads, input_ids=input_ids,
                     attention_mask=attention_mask)

    x = base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    if 0 in plan.hidden:
        taps.hidden[0] = x
    for i, layer in enumerate(layers):
        attn = layer.attention.self
        q = _split_heads(attn.query(x), heads)
        k = _split_heads(attn.key(x), heads)
        v = _split_heads(attn.value(x), heads)
        for name, value in (("q", q), ("k", k), ("v", v)):
            if i in getattr(plan, name):
                getattr(taps, name)[i] = value
        dropout_p = attn.dropout.p if model.training else 0.0
        context = attend(q, k, v, key_mask, dropout_p)
        context = context.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        attended = layer.attention.output(context, x)
        x = layer.output(layer.intermediate(attended), attended)
        if i + 1 in plan.hidden:
            taps.hidden[i + 1] = x
    if plan.decoder:
        transform, decoder = mlm_head(model)
        taps.decoder_input = transform(x)
        taps.decoder_weight, taps.decoder_bias = decoder.weight, decoder.bias
    return taps
