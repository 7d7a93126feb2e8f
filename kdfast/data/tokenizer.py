"""Tokenizers: load the teacher's fast tokenizer, build a small WordPiece one for CPU presets, and check
that a tokenizer matches the teacher it feeds."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def load(name_or_path: str):
    """The fast tokenizer saved with a model (directory or hub name)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    if not tokenizer.is_fast:
        raise ValueError(f"tokenizer: expected a fast tokenizer for {name_or_path!r}, got {type(tokenizer).__name__}")
    return tokenizer


def build_wordpiece(docs: Iterable[str], vocab_size: int, out_dir: Path):
    """Train a lowercasing BERT WordPiece tokenizer on ``docs`` and save it (HF format) in ``out_dir``."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(docs, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                show_progress=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(tokenizer_object=trainer._tokenizer, do_lower_case=True, unk_token="[UNK]",
                                  sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def check_matches(tokenizer, vocab_size: int, teacher_tokenizer=None, what: str = "teacher") -> None:
    """The tokenizer must address exactly the model's vocabulary (and equal the teacher's own, if known)."""
    if len(tokenizer) != vocab_size:
        raise ValueError(f"tokenizer: expected {vocab_size} tokens to match the {what}'s vocabulary, got "
                         f"{len(tokenizer)}; use the tokenizer saved with the {what}")
    if teacher_tokenizer is not None and tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        differing = sorted(set(tokenizer.get_vocab().items()) ^ set(teacher_tokenizer.get_vocab().items()))[:3]
        raise ValueError(f"tokenizer: expected the {what}'s vocabulary, got one that differs (e.g. {differing}); "
                         f"use the tokenizer saved with the {what}")


def find_saved(model_dir: str) -> Optional[str]:
    """``model_dir`` if a tokenizer was saved there, else None."""
    path = Path(model_dir)
    found = any((path / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    return str(path) if found else None
