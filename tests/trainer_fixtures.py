"""Small corpora, tokenizers and run arguments shared by the trainer tests (no downloads), and the
environment, arguments and training log of a `kdfast pretrain` run in a subprocess."""
from __future__ import annotations

import json
import os
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


REPO = Path(__file__).resolve().parents[1]


def kdfast_env() -> dict:
    """This environment for a `kdfast` subprocess: the checkout first on PYTHONPATH, one thread, no torchrun rank."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def train_steps(run_dir: Path) -> list:
    """The "train" events of ``run_dir/log.jsonl`` so far ([] before the first)."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["event"] == "train"]


def pretrain_args(tmp_path: Path, run_dir: Path, budget: str, *extra: str) -> list:
    """`kdfast pretrain` of the no-KD arm on TINY_MODEL over a corpus written in ``tmp_path``."""
    return ["pretrain", "--strategy", "no-kd", "--data", str(write_corpus(tmp_path)), "--budget", budget,
            "--out", str(run_dir), *TINY_MODEL, "train.eval_points=4", *extra]
