"""Tiny Hugging Face models (BERT masked LM, Llama causal LM), padded examples, a float64 eager reference of
the distillation loss and a Trainer that records its losses, shared by the DistillationTrainer tests and the
ranks of tests/parallel_worker.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM, TrainingArguments

from kdfast.integrations.transformers import DistillationTrainer

VOCAB, LENGTH = 48, 12


def tiny_bert(width: int, vocab: int = VOCAB) -> BertForMaskedLM:
    """A 1-layer BERT MLM (tied head with bias, transform before the decoder), no dropout; a wide
    init so teacher and student logits differ clearly."""
    return BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=2 * width, max_position_embeddings=LENGTH,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                      initializer_range=0.3))


def tiny_llama(width: int, tied: bool, vocab: int = VOCAB) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, intermediate_size=2 * width,
                                        max_position_embeddings=LENGTH, tie_word_embeddings=tied,
                                        initializer_range=0.3))


def examples(count: int, causal: bool, seed: int = 0) -> list[dict]:
    """Right-padded examples with varying lengths; MLM labels on a random 15-60% of real tokens
    (so micro-batches hold different label counts), causal labels = the real tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        ids = torch.randint(1, VOCAB, (LENGTH,), generator=gen)
        mask = torch.zeros(LENGTH, dtype=torch.long)
        mask[: LENGTH - (i % 4) * 2] = 1
        if causal:
            labels = ids.masked_fill(mask == 0, -100)
        else:
            chosen = (torch.rand(LENGTH, generator=gen) < 0.15 + 0.15 * (i % 4)) & (mask == 1)
            chosen[0] = True
            labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels})
    return out


def stack(batch: list[dict]) -> dict:
    return {k: torch.stack([e[k] for e in batch]) for k in batch[0]}


def reference_loss(student, teacher, inputs: dict, temperature: float, kind: str, causal: bool,
                   kd_weight: float = 1.0, ce_weight: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Plain PyTorch: full HF logits, then T² KL (or soft CE, or JSD_beta) + CE in float64 over the targets,
    summed and divided by the number of targets."""
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    s = student(**model_inputs).logits.double()
    with torch.no_grad():
        t = teacher(**model_inputs).logits.double()
    labels = inputs["labels"].masked_fill(inputs["attention_mask"] == 0, -100)
    if causal:
        s, t, labels = s[:, :-1], t[:, :-1], labels[:, 1:]
    keep = labels != -100
    s, t, labels = s[keep], t[keep], labels[keep]
    log_q, p = F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1)
    if kind == "jsd":
        q = log_q.exp()
        m = beta * p + (1 - beta) * q
        rows = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    else:
        rows = (p * (p.log() - log_q)).sum(-1) if kind == "kl" else -(p * log_q).sum(-1)
    kd = temperature ** 2 * rows.sum()
    ce = F.cross_entropy(s, labels, reduction="sum")
    return (kd_weight * kd + ce_weight * ce) / keep.sum()


class RecordingTrainer(DistillationTrainer):
    """Keeps every training loss compute_loss returns (Trainer's logs round to 4 digits)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.losses.append(result.item())
        return result


def make_trainer(tmp_path, student, teacher, data, steps: int, batch: int, accumulation: int = 1,
                 optim: str = "adamw_torch", lr: float = 1e-2, **options) -> RecordingTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=steps,
                             per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                             learning_rate=lr, optim=optim, weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0,
                             lr_scheduler_type="constant", logging_steps=1, save_strategy="no", seed=0,
                             remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0)
    trainer = RecordingTrainer(student, args, teacher=teacher, train_dataset=data, **options)
    trainer.losses = []
    return trainer


def run_trainer(*args, **kwargs) -> RecordingTrainer:
    trainer = make_trainer(*args, **kwargs)
    trainer.train()
    return trainer
