"""Softcapped and rescaled heads through kdfast.integrations.transformers: tiny Gemma 2 (final_logit_softcapping),
Cohere (logit_scale) and Granite (logits_scaling) causal LMs, whose own logits (HF forward) are the float64
reference; a Gemma-2-style student trains through DistillationTrainer."""
from __future__ import annotations

import copy

import pytest
import torch
from distillation_fixtures import LENGTH, VOCAB, examples, reference_loss, run_trainer, stack
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from kdfast.integrations.lm_head import find_lm_head
from kdfast.integrations.transformers import distillation_loss

SHAPE = dict(vocab_size=VOCAB, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=LENGTH, initializer_range=0.3)


def gemma2(width: int, cap: float = 2.0) -> Gemma2ForCausalLM:
    """Gemma 2 with a small cap (its real one is 30) so the tiny model's logits reach the tanh's bend."""
    return Gemma2ForCausalLM(Gemma2Config(hidden_size=width, intermediate_size=2 * width, head_dim=width // 2,
                                          final_logit_softcapping=cap, attn_logit_softcapping=50.0,
                                          query_pre_attn_scalar=width // 2, sliding_window=LENGTH, **SHAPE))


def cohere(width: int, scale: float = 3.0) -> CohereForCausalLM:
    return CohereForCausalLM(CohereConfig(hidden_size=width, intermediate_size=2 * width, logit_scale=scale,
                                          **SHAPE))


def granite(width: int, scaling: float = 0.25) -> GraniteForCausalLM:
    return GraniteForCausalLM(GraniteConfig(hidden_size=width, intermediate_size=2 * width, logits_scaling=scaling,
                                            **SHAPE))


def llama(width: int) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(hidden_size=width, intermediate_size=2 * width, **SHAPE))


PAIRS = {  # (student, teacher)
    "gemma2-gemma2": lambda: (gemma2(16, cap=2.0), gemma2(24, cap=3.0)),
    "cohere-granite": lambda: (cohere(16), granite(24)),
    "llama-gemma2": lambda: (llama(16), gemma2(24)),
}


def test_heads_read_from_configs():
    assert (find_lm_head(gemma2(16, cap=30.0), "m").softcap, find_lm_head(gemma2(16), "m").logit_scale) == (30.0, 1.0)
    assert (find_lm_head(cohere(16, 0.0625), "m").softcap, find_lm_head(cohere(16, 0.0625), "m").logit_scale) == (
        None, 0.0625)
    assert find_lm_head(granite(16, 8.0), "m").logit_scale == 1 / 8.0
    assert (find_lm_head(llama(16), "m").softcap, find_lm_head(llama(16), "m").logit_scale) == (None, 1.0)


@pytest.mark.parametrize("pair, kind, backend", [("gemma2-gemma2", kind, backend) for kind in ("kl", "jsd")
                                                  for backend in ("cpu", "torch")]
                         + [("cohere-granite", "kl", "cpu"), ("llama-gemma2", "jsd", "cpu")])
def test_loss_and_gradients_match_the_models_own_logits(pair, kind, backend):
    """kdfast's fused loss equals T² KL (or JSD) + CE on the HF models' logits (softcap and scales applied by
    the models' forward), in float64: loss and every student gradient."""
    torch.manual_seed(0)
    student, teacher = PAIRS[pair]()
    inputs = stack(examples(4, causal=True))
    out = distillation_loss(student, teacher, inputs, temperature=2.0, kd_weight=0.7, ce_weight=0.3, kind=kind,
                            beta=0.4, backend=backend)
    out.loss.backward()
    reference_student = copy.deepcopy(student)
    reference_student.zero_grad()
    expected = reference_loss(reference_student, teacher, inputs, 2.0, kind, True, kd_weight=0.7, ce_weight=0.3,
                              beta=0.4)
    expected.backward()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    got = torch.cat([p.grad.flatten() for p in student.parameters()]).double()
    ref = torch.cat([p.grad.flatten() for p in reference_student.parameters()]).double()
    assert (got - ref).norm() <= 1e-5 * ref.norm()


def test_gemma2_student_trains_through_distillation_trainer(tmp_path):
    student, teacher = gemma2(16, cap=2.0), gemma2(24, cap=3.0)
    data = examples(6, causal=True)
    expected = reference_loss(copy.deepcopy(student), teacher, stack(data), 2.0, "kl", True, kd_weight=0.7,
                              ce_weight=0.3)
    trainer = run_trainer(tmp_path, student, teacher, data, steps=6, batch=6, temperature=2.0, kd_weight=0.7,
                          ce_weight=0.3)
    assert trainer.losses[0] == pytest.approx(expected.item(), rel=1e-5)
    assert trainer.losses[-1] < trainer.losses[0] - 1e-3


def test_bad_cap_in_config_names_the_field():
    inputs = stack(examples(2, causal=True))
    with pytest.raises(ValueError, match=r"teacher: expected config.final_logit_softcapping to be None or a finite "
                                         r"number > 0, got 0.0"):
        distillation_loss(gemma2(16), gemma2(24, cap=0.0), inputs)
