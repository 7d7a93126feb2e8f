"""Graph breaks of a training step under torch.compile, per strategy (``torch._dynamo.explain``).

A tiny BERT teacher and student (kdfast.models), one batch with padding and sparse teacher targets
for the cached arm; the step is teacher pass + student pass + loss. Prints one line per strategy:
graphs, breaks, and the first break reasons. Usage: ``python benchmarks/compile_breaks.py [NAME ...]``.
"""
from __future__ import annotations

import sys

import torch
from transformers import BertConfig, BertForMaskedLM

from kdfast import models, strategies
from kdfast.cache.serve import TARGET_KEYS

VOCAB, LENGTH, TOP_K = 61, 13, 4


def tiny(layers: int) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def batch() -> dict:
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, -4:] = 0
    labels = torch.full((2, LENGTH), -100)
    labels[:, 2], labels[0, 5] = ids[:, 2], ids[0, 5]
    labelled = int((labels != -100).sum())
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "token_type_ids": torch.zeros_like(ids),
            TARGET_KEYS[0]: torch.randint(0, VOCAB, (labelled, TOP_K)),
            TARGET_KEYS[1]: torch.rand(labelled, TOP_K) / TOP_K}


def main(names: list[str]) -> None:
    torch.manual_seed(0)
    teacher = models.load_teacher(BertForMaskedLM(tiny(2)), device="cpu")
    inputs = batch()
    for name in names:
        strategy = strategies.build(name, teacher, models.build_student(tiny(2), teacher=teacher))

        def step(batch, strategy=strategy):
            with torch.no_grad():
                taps = strategy.teacher_pass(batch)
            return strategy.student_pass(batch, taps).loss

        torch._dynamo.reset()
        explained = torch._dynamo.explain(step)(inputs)
        print(f"{name}: {explained.graph_count} graphs, {explained.graph_break_count} breaks")
        for reason in explained.break_reasons[:3]:
            print("   ", reason.reason.splitlines()[0])


if __name__ == "__main__":
    main(sys.argv[1:] or ["no-kd", "vanilla", "distilbert", "tinybert", "minilm", "minilm_v2", "vanilla-cached-topk"])
