"""Tiny BERT teacher/student configs and MLM batches shared by the strategy tests."""
from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM

from kdfast import models

VOCAB, L = 61, 13


def tiny_config(layers=4, hidden=32, heads=4, **kw) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=2 * hidden, max_position_embeddings=64, attention_probs_dropout_prob=0.0,
                      **kw)


def tiny_teacher():
    return models.load_teacher(BertForMaskedLM(tiny_config()), device="cpu")


def make_batch(batch=2, length=L):
    ids = torch.randint(0, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 4:] = 0
    labels = torch.full((batch, length), -100)
    labels[:, 2] = ids[:, 2]
    labels[0, 5] = ids[0, 5]
    return dict(input_ids=ids, attention_mask=mask, labels=labels,
                token_type_ids=torch.zeros(batch, length, dtype=torch.long))
