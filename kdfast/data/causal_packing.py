"""Pack documents for a causal LM: each document as ``<bos> tokens <eos>`` (the markers the tokenizer
has), one stream, cut into full sequences of ``seq_len`` tokens (no padding, the tail dropped), as
Hugging Face's ``run_clm`` groups texts. Every position but the last is a target: position i
predicts token i+1."""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

from kdfast.data import corpus
from kdfast.data.packing import token_blocks


def pack(docs: Iterable[str], tokenizer, seq_len: int, max_sequences: Optional[int] = None) -> torch.Tensor:
    """[N, seq_len] int32 token ids; stops after ``max_sequences`` sequences when given."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len: expected an int >= 2 (a causal LM needs one target), got {seq_len!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer: expected an end-of-sequence token to separate documents, got "
                         f"{type(tokenizer).__name__} without eos_token")
    prefix = () if tokenizer.bos_token_id is None else (tokenizer.bos_token_id,)
    blocks = token_blocks(docs, tokenizer, seq_len, max_sequences, prefix, (tokenizer.eos_token_id,))
    return torch.tensor(blocks, dtype=torch.int32)


def load(sources: Sequence[str], tokenizer, seq_len: int, max_tokens: Optional[int] = None) -> torch.Tensor:
    """The packed sequences of ``sources`` (text files or folders, ``.jsonl`` files, ``hf:NAME``),
    at most ``max_tokens`` tokens' worth."""
    corpus.check_sources(sources)
    cap = None if max_tokens is None else math.ceil(max_tokens / seq_len)
    return pack(corpus.documents(sources), tokenizer, seq_len, cap)
