"""Assemble the packed training and held-out sequences from the ``data`` section of a config."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from kdfast.data import corpus, packing
from kdfast.data.stream import MaskingConfig


@dataclass
class PretrainData:
    """``train`` [N, L] and ``heldout`` [M, L] int32 token ids, and how to mask them."""

    train: torch.Tensor
    heldout: torch.Tensor
    masking: MaskingConfig

    @property
    def unique_tokens(self) -> int:
        return self.train.numel()


def load(train_sources: Sequence[str], tokenizer, seq_len: int = 128,
         heldout_sources: Optional[Sequence[str]] = None, heldout_fraction: float = 0.05,
         heldout_sequences: int = 256, unique_tokens: Optional[int] = None,
         max_tokens: Optional[int] = None, masking: str = "dynamic", mask_prob: float = 0.15,
         max_predictions: int = 20) -> PretrainData:
    """Tokenize and pack the sources. Without ``heldout_sources`` the last ``heldout_fraction`` of the
    training sequences is held out. ``unique_tokens`` keeps only the first that many training tokens
    (limited-data mode); ``max_tokens`` caps how much of an endless (streamed) corpus is read."""
    corpus.check_sources(train_sources)
    if heldout_sources:
        corpus.check_sources(heldout_sources)
    cap = None if max_tokens is None else math.ceil(max_tokens / seq_len)
    train = packing.pack(corpus.documents(train_sources), tokenizer, seq_len, cap)
    if heldout_sources:
        heldout = packing.pack(corpus.documents(heldout_sources), tokenizer, seq_len, heldout_sequences)
    else:
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"data.heldout_fraction: expected a number in (0, 1), got {heldout_fraction}")
        cut = train.shape[0] - max(1, int(train.shape[0] * heldout_fraction))
        if cut < 1:
            raise ValueError(f"data: expected at least 2 sequences to split off a held-out set, got {train.shape[0]}")
        train, heldout = train[:cut], train[cut:][:heldout_sequences]
    if unique_tokens is not None:
        keep = math.ceil(unique_tokens / seq_len)
        if keep < 1:
            raise ValueError(f"unique_tokens: expected at least one sequence's worth ({seq_len}), got {unique_tokens}")
        if keep > train.shape[0]:
            raise ValueError(f"unique_tokens: expected at most the corpus size {train.numel()} tokens, "
                             f"got {unique_tokens}")
        train = train[:keep]
    ids = packing.special_ids(tokenizer)
    special = tuple(sorted({ids["cls"], ids["sep"], ids["pad"], ids["mask"]}))
    config = MaskingConfig(len(tokenizer), ids["mask"], special, masking, mask_prob, max_predictions)
    return PretrainData(train, heldout, config)
