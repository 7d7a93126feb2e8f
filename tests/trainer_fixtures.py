"""Small corpora, tokenizers and run arguments shared by the trainer tests (no downloads)."""
from __future__ import annotations

from pathlib import Path

from kdfast.data.corpus import BUILTIN_PYTHON_DOCS, documents

TINY_MODEL = ["student.layers=1", "student.hidden=32", "student.heads=2", "student.intermediate=64",
              "student.attention_dropout=0.0", "teacher.layers=2", "teacher.hidden=32", "teacher.heads=2",
              "teacher.intermediate=64", "teacher.attention_dropout=0.0", "teacher.build_tokenizer=600",
              "train.progress=false", "train.eval_batches=1", "data.heldout_sequences=8", "data.seq_len=32",
              "train.batch_size=8", "train.log_steps=1", "eval.probe_test=60", "eval.probe_pool=60",
              "eval.probe_seeds=[0, 1]", "eval.probe_tasks=[bshift, sentlen, adjacent]",
              "eval.mlm_probe_steps=5", "eval.mlm_probe_sequences=16", "eval.mlm_probe_batch=64"]


def write_corpus(folder: Path, characters: int = 60_000) -> Path:
    """Real English text (the Python docs shipped with CPython) written to ``folder/corpus.txt``."""
    text, size = [], 0
    for doc in documents([BUILTIN_PYTHON_DOCS]):
        text.append(doc)
        size += len(doc)
        if size >= characters:
            break
    path = folder / "corpus.txt"
    path.write_text("\n\n".join(text))
    return path
