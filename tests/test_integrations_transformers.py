"""kdfast.integrations.transformers: DistillationTrainer (the real HF Trainer) and distillation_loss
on tiny BERT (masked LM) and Llama (causal LM) models, against an eager float64 reference."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
    TrainingArguments,
)

from kdfast.integrations.transformers import DistillationTrainer, distillation_loss

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


MODELS = {
    "bert-tied": (lambda: (tiny_bert(16), tiny_bert(24)), False),
    "llama-untied": (lambda: (tiny_llama(16, tied=False), tiny_llama(24, tied=True)), True),
    "llama-tied": (lambda: (tiny_llama(16, tied=True), tiny_llama(24, tied=False)), True),
}


@pytest.mark.parametrize("name,kind,temperature", [("bert-tied", "kl", 2.0), ("llama-untied", "kl", 1.0),
                                                   ("llama-tied", "soft_ce", 1.5)])
def test_trainer_step0_matches_eager_reference_and_loss_decreases(tmp_path, name, kind, temperature):
    build, causal = MODELS[name]
    student, teacher = build()
    data = examples(6, causal)
    expected = reference_loss(copy.deepcopy(student), teacher, stack(data), temperature, kind, causal,
                              kd_weight=0.7, ce_weight=0.3)
    trainer = run_trainer(tmp_path, student, teacher, data, steps=6, batch=6, temperature=temperature, kind=kind,
                          kd_weight=0.7, ce_weight=0.3, eval_dataset=data)
    assert trainer.losses[0] == pytest.approx(expected.item(), rel=1e-5)
    assert trainer.losses[-1] < trainer.losses[0] - 1e-3
    assert trainer.evaluate()["eval_loss"] < trainer.losses[0]


def test_head_gradients_reach_tied_and_untied_weights():
    """Tied: the one embedding matrix gets the head's gradient; untied: lm_head does, and the
    gradient equals the eager reference's."""
    for tied in (True, False):
        student, teacher = tiny_llama(16, tied=tied), tiny_llama(24, tied=True)
        twin = copy.deepcopy(student)
        inputs = stack(examples(3, causal=True))
        distillation_loss(student, teacher, inputs).loss.backward()
        reference_loss(twin, teacher, inputs, 1.0, "kl", causal=True).backward()
        for mine, ref in ((student.lm_head.weight, twin.lm_head.weight),
                          (student.model.embed_tokens.weight, twin.model.embed_tokens.weight)):
            assert mine.grad is not None
            assert (mine.grad - ref.grad).norm() <= 1e-5 * ref.grad.norm()


def tiny_roberta(width: int) -> RobertaForMaskedLM:
    return RobertaForMaskedLM(RobertaConfig(vocab_size=VOCAB, hidden_size=width, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=2 * width,
                                            max_position_embeddings=LENGTH + 2, hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0, initializer_range=0.3))


def tiny_gpt2(width: int) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=width, n_layer=1, n_head=2, n_positions=LENGTH,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3,
                                      bos_token_id=1, eos_token_id=1))


@pytest.mark.parametrize("build,causal", [(tiny_roberta, False), (tiny_gpt2, True)])
def test_helper_matches_reference_on_roberta_and_gpt2(build, causal):
    """RoBERTa's lm_head (dense, GELU, LayerNorm, decoder with bias) and GPT-2's tied head (a causal
    LM recognised by class, as its loss_type is unset)."""
    student, teacher = build(16), build(24)
    inputs = stack(examples(3, causal))
    got = distillation_loss(student, teacher, inputs, temperature=1.5).loss
    expected = reference_loss(student, teacher, inputs, 1.5, "kl", causal)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_bf16_teacher_with_fp32_student_within_bf16_tolerance():
    student, teacher = tiny_bert(16), tiny_bert(24).to(torch.bfloat16)
    inputs = stack(examples(4, causal=False))
    out = distillation_loss(student, teacher, inputs, temperature=2.0)
    assert out.loss.dtype == torch.float32
    expected = reference_loss(student, teacher, inputs, 2.0, "kl", causal=False)
    assert out.loss.item() == pytest.approx(expected.item(), rel=2e-2)
    out.loss.backward()
    assert teacher.bert.embeddings.word_embeddings.weight.grad is None


def _flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _param_deltas(before, after) -> torch.Tensor:
    return torch.cat([(a.detach() - b).reshape(-1) for b, a in zip(before, after.parameters())])


@pytest.mark.parametrize("causal", [False, True])
def test_trainer_gradient_accumulation_equals_one_large_batch(tmp_path, causal):
    """4 micro-batches of 2 (different label counts) then one SGD step == one step on 8 (fp32)."""
    student, teacher = (tiny_llama(16, tied=False), tiny_llama(24, tied=True)) if causal else (tiny_bert(16),
                                                                                                tiny_bert(24))
    data = examples(8, causal)
    assert len({int((e["labels"] != -100).sum()) for e in data}) > 1
    start = [p.detach().clone() for p in student.parameters()]
    large, small = copy.deepcopy(student), copy.deepcopy(student)
    run_trainer(tmp_path / "large", large, teacher, data, steps=1, batch=8, optim="sgd", lr=1.0, temperature=2.0)
    run_trainer(tmp_path / "small", small, teacher, data, steps=1, batch=2, accumulation=4, optim="sgd", lr=1.0,
                temperature=2.0)
    delta_large, delta_small = _param_deltas(start, large), _param_deltas(start, small)
    assert delta_large.norm() > 0
    assert (delta_small - delta_large).norm() <= 1e-5 * delta_large.norm()


def test_helper_gradient_accumulation_with_num_items_in_batch():
    student, teacher = tiny_bert(16), tiny_bert(24)
    data = examples(8, causal=False)
    whole = stack(data)
    distillation_loss(student, teacher, whole).loss.backward()
    expected = _flat_grads(student)
    student.zero_grad()
    total = int((whole["labels"] != -100).sum())
    for i in range(0, 8, 2):
        distillation_loss(student, teacher, stack(data[i:i + 2]), num_items_in_batch=total).loss.backward()
    assert (_flat_grads(student) - expected).norm() <= 1e-5 * expected.norm()


def test_trainer_strategy_trains_student_and_projection(tmp_path):
    """strategy="tinybert" (canonical) owns a projection: it joins the optimizer and learns."""
    student, teacher = tiny_bert(16), tiny_bert(24)
    data = examples(4, causal=False)
    trainer = make_trainer(tmp_path, student, teacher, data, steps=2, batch=4, strategy="tinybert")
    proj_before = copy.deepcopy(trainer.strategy.proj.weight.detach())
    trainer.train()
    assert all(torch.isfinite(torch.tensor(trainer.losses)))
    assert not torch.equal(trainer.strategy.proj.weight.detach(), proj_before)


def test_bad_input_fails_before_any_work(tmp_path):
    student, teacher = tiny_bert(16), tiny_bert(24)
    inputs = stack(examples(2, causal=False))
    with pytest.raises(ValueError, match=r"teacher: expected the student's vocabulary size V=48.*got V=50"):
        distillation_loss(student, tiny_bert(24, vocab=50), inputs)
    with pytest.raises(TypeError, match=r"student: expected a model with an LM head.*BertModel"):
        distillation_loss(BertModel(student.config), teacher, inputs)
    with pytest.raises(ValueError, match=r"num_items_in_batch: expected a count > 0.*got 0"):
        distillation_loss(student, teacher, inputs, num_items_in_batch=0)
    with torch.device("meta"):
        meta_teacher = tiny_bert(24)
    with pytest.raises(ValueError, match=r"teacher: expected weights on a real device.*meta"):
        distillation_loss(student, meta_teacher, inputs)
    with pytest.raises(TypeError, match=r"teacher: expected a transformers PreTrainedModel.*got str"):
        distillation_loss(student, "bert-base-uncased", inputs)
    with pytest.raises(TypeError, match=r"inputs: expected a dict.*got Tensor"):
        distillation_loss(student, teacher, inputs["input_ids"])
    with pytest.raises(ValueError, match=r"kind: expected one of"):
        distillation_loss(student, teacher, inputs, kind="tv")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"teacher: expected the student's vocabulary size"):
        DistillationTrainer(student, args, teacher=tiny_bert(24, vocab=50))
    with pytest.raises(ValueError, match=r"strategy: expected None or one of"):
        DistillationTrainer(student, args, teacher=teacher, strategy="tinybart")


@pytest.mark.parametrize("causal", [False, True])
def test_under_bf16_autocast_within_bf16_tolerance(causal):
    """Mixed precision as Trainer(bf16=True) runs it: the student head computes in bf16."""
    student, teacher = (tiny_llama(16, tied=False), tiny_llama(24, tied=True)) if causal else (tiny_bert(16),
                                                                                                tiny_bert(24))
    inputs = stack(examples(4, causal))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distillation_loss(student, teacher, inputs, temperature=2.0)
    out.loss.backward()
    expected = reference_loss(student, teacher, inputs, 2.0, "kl", causal)
    assert out.loss.item() == pytest.approx(expected.item(), rel=2e-2)
    assert student.get_output_embeddings().weight.grad.dtype == torch.float32
