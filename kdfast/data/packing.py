"""Tokenize documents with the teacher's fast tokenizer and pack them into full sequences.

Documents are joined into one token stream with ``[SEP]`` between them and cut into blocks of
``seq_len - 2`` tokens, each wrapped as ``[CLS] block [SEP]``; so every sequence is full and needs no
padding. The result is an int32 tensor [N, seq_len].
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch

_TOKENIZE_BATCH = 256


def special_ids(tokenizer) -> dict:
    """The ids packing and masking need; refuses a tokenizer without them."""
    ids = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "mask": tokenizer.mask_token_id,
           "pad": tokenizer.pad_token_id}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"tokenizer: expected a BERT-style tokenizer with [CLS]/[SEP]/[MASK]/[PAD], "
                         f"got {type(tokenizer).__name__} without {', '.join(missing)}")
    return ids


def token_blocks(docs: Iterable[str], tokenizer, size: int, max_blocks: Optional[int] = None,
                 prefix: Sequence[int] = (), suffix: Sequence[int] = ()) -> List[List[int]]:
    """Each document's tokens as ``prefix + tokens + suffix``, concatenated into one stream and cut into
    blocks of ``size`` tokens (the incomplete tail is dropped); at most ``max_blocks`` blocks."""
    stream: List[int] = []
    blocks: List[List[int]] = []
    batch: List[str] = []

    def flush() -> bool:
        for tokens in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream.extend(prefix)
            stream.extend(tokens)
            stream.extend(suffix)
        batch.clear()
        start = 0
        while len(stream) - start >= size:
            blocks.append(stream[start:start + size])
            start += size
            if max_blocks is not None and len(blocks) >= max_blocks:
                return True
        del stream[:start]
        return False

    for doc in docs:
        batch.append(doc)
        if len(batch) == _TOKENIZE_BATCH and flush():
            break
    else:
        if batch:
            flush()
    if not blocks:
        raise ValueError(f"data: expected enough text for one sequence of {size} tokens, got "
                         f"{len(stream)} tokens in total")
    return blocks[:max_blocks]


def pack(docs: Iterable[str], tokenizer, seq_len: int = 128, max_sequences: Optional[int] = None) -> torch.Tensor:
    """[N, seq_len] int32 token ids; stops after ``max_sequences`` full sequences when given."""
    if seq_len < 8:
        raise ValueError(f"seq_len: expected an int >= 8, got {seq_len}")
    ids = special_ids(tokenizer)
    blocks = token_blocks(docs, tokenizer, seq_len - 2, max_sequences, suffix=(ids["sep"],))
    return torch.tensor([[ids["cls"], *block, ids["sep"]] for block in blocks], dtype=torch.int32)
