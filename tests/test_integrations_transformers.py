"""kdfast.integrations.transformers: DistillationTrainer (the real HF Trainer) and distillation_loss
on tiny BERT (masked LM) and Llama (causal LM) models, against an eager float64 reference."""
from __future__ import annotations

import copy

import pytest
import torch
from distillation_fixtures import (
    LENGTH,
    VOCAB,
    examples,
    make_trainer,
    reference_loss,
    run_trainer,
    stack,
    tiny_bert,
    tiny_llama,
)
from transformers import BertModel, GPT2Config, GPT2LMHeadModel, RobertaConfig, RobertaForMaskedLM, TrainingArguments

from kdfast.integrations.transformers import DistillationTrainer, distillation_loss

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
