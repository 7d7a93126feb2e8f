"""Frozen-encoder features for the probes: what a pretrained model's last layer says about a text.

Pooling (named in the report): the mean of the last layer's token states over the sentence's
word-piece tokens, [CLS], [SEP] and padding excluded. Texts are encoded in length-sorted batches.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch

POOLING = "mean of the last layer's token states over the sentence's tokens ([CLS], [SEP], padding excluded)"


def load_encoder(model_path: str, device: torch.device):
    """(encoder without its LM head, in eval mode, fp32; its tokenizer) from a save_pretrained folder."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from kdfast.data import tokenizer as tokenizers

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused MLM head's weights are expected to be dropped
    try:
        model = AutoModel.from_pretrained(model_path, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.to(device=device, dtype=torch.float32).eval(), tokenizers.load(model_path)


@torch.inference_mode()
def sentence_features(model, tokenizer, texts: Sequence[str], device: torch.device, max_length: int = 64,
                      batch_size: int = 128) -> Dict[str, np.ndarray]:
    """{text: pooled features [H] float32} for the distinct ``texts``."""
    unique = sorted(set(texts), key=len)
    out: Dict[str, np.ndarray] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start:start + batch_size]
        batch = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        states = model(**batch).last_hidden_state.float()                   # [B, L, H]
        ids = batch["input_ids"]
        keep = batch["attention_mask"].bool() & (ids != tokenizer.cls_token_id) & (ids != tokenizer.sep_token_id)
        weights = keep.unsqueeze(-1).float()
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # [B, H]
        out.update(zip(chunk, pooled.cpu().numpy()))
    return out


@torch.inference_mode()
def word_features(model, tokenizer, sentences: Sequence[str], device: torch.device, max_length: int = 64,
                  batch_size: int = 128) -> Dict[str, np.ndarray]:
    """{sentence: [words, H] last-layer state of each whitespace word's first word-piece} (zeros for
    words cut off by ``max_length``)."""
    unique = sorted(set(sentences), key=len)
    out: Dict[str, np.ndarray] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start:start + batch_size]
        words = [s.split() for s in chunk]
        batch = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt")
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        states = model(**inputs).last_hidden_state.float().cpu().numpy()          # [B, L, H]
        for row, (sentence, tokens) in enumerate(zip(chunk, words)):
            first = np.zeros((len(tokens), states.shape[-1]), dtype=np.float32)
            seen = set()
            for position, word in enumerate(batch.word_ids(row)):
                if word is not None and word not in seen:
                    seen.add(word)
                    first[word] = states[row, position]
            out[sentence] = first
    return out


@torch.inference_mode()
def token_features(model, input_ids: torch.Tensor, positions: torch.Tensor, device: torch.device,
                   batch_size: int = 64) -> torch.Tensor:
    """Last-layer states [P, H] at ``positions`` [P, 2] (sequence, token) of ``input_ids`` [N, L]."""
    out = []
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start:start + batch_size].long().to(device)
        states = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.float()
        chosen = positions[(positions[:, 0] >= start) & (positions[:, 0] < start + ids.shape[0])]
        out.append(states[chosen[:, 0] - start, chosen[:, 1]].cpu())
    return torch.cat(out)
