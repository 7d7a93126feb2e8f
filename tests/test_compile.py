"""torch.compile of a training step over the kdfast custom ops: a tiny BERT student and teacher
(kdfast.models) with each strategy's loss trace as one graph (``fullgraph=True`` raises on a graph
break, and the backend counts one graph; ``torch._dynamo.explain`` of the same step reports 1 graph,
0 breaks, docs/losses.md), and the compiled loss and parameter gradients equal eager within 1e-5.

The step compiled is teacher pass + student pass + loss (what ``TrainStep`` runs before
``backward``); the backward runs AOTAutograd's compiled graph, through the ops' autograd formulas.
The ``aot_eager`` backend traces exactly what inductor receives (Dynamo + AOTAutograd, the ops'
fake implementations and autograd formulas) without generating C++, which keeps this CI-fast on CPU.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import BertConfig, BertForMaskedLM, TrainingArguments

from kdfast import _ext, models, strategies
from kdfast.cache.serve import TARGET_KEYS
from kdfast.integrations.transformers import DistillationTrainer

VOCAB, L, TOP_K = 61, 13, 4
STRATEGIES = ["no-kd", "vanilla", "distilbert", "tinybert", "minilm", "minilm_v2", "vanilla-cached-topk"]

pytestmark = pytest.mark.skipif(_ext.C is None, reason="kdfast._C is not built")


def tiny_config(layers: int) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return models.load_teacher(BertForMaskedLM(tiny_config(1)), device="cpu")


def make_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, L), generator=g)
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, L - 4:] = 0
    labels = torch.full((2, L), -100)
    labels[:, 2], labels[0, 5], labels[1, 7] = ids[:, 2], ids[0, 5], ids[1, 7]
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels, token_type_ids=torch.zeros_like(ids))
    labelled = int((labels != -100).sum())  # the cached arm's targets: [M, K] for the M labelled positions
    weights = torch.rand(labelled, TOP_K, generator=g)
    batch[TARGET_KEYS[0]] = torch.randint(0, VOCAB, (labelled, TOP_K), generator=g)
    batch[TARGET_KEYS[1]] = weights / weights.sum(1, keepdim=True) * 0.9
    return batch


def loss_and_grads(strategy, step, batch) -> list:
    strategy.zero_grad(set_to_none=True)
    loss = step(batch)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in strategy.trainable_parameters() if p.grad is not None]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


@pytest.mark.slow
@pytest.mark.parametrize("name", STRATEGIES)
def test_compiled_step_has_no_graph_break_and_equals_eager(teacher, name):
    torch.manual_seed(2)
    student = models.build_student(tiny_config(1), teacher=teacher)
    strategy = strategies.build(name, teacher, student)
    batch = make_batch()

    def step(batch):
        with torch.no_grad():
            taps = strategy.teacher_pass(batch)
        return strategy.student_pass(batch, taps).loss

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # one trace serves the graph count and the run
    eager = loss_and_grads(strategy, step, batch)
    compiled = loss_and_grads(strategy, torch.compile(step, fullgraph=True, backend=counter), batch)
    assert counter.frame_count == 1  # fullgraph=True: a break would have raised
    assert len(compiled) == len(eager) > 1
    for got, ref in zip(compiled, eager):
        assert rel_err(got, ref) < 1e-5


@pytest.mark.slow
def test_distillation_trainer_runs_with_torch_compile(teacher, tmp_path):
    """``TrainingArguments(torch_compile=True)``: HF compiles the student, DistillationTrainer its loss
    path (the strategy step); two steps train with finite losses."""
    torch.manual_seed(3)
    student = models.build_student(tiny_config(1), teacher=teacher)
    before = [p.detach().clone() for p in student.parameters()]
    batch = make_batch()
    data = [{k: batch[k][i] for k in ("input_ids", "attention_mask", "labels")} for i in range(2)] * 2
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2,
                             per_device_train_batch_size=2, logging_steps=1, save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0,
                             torch_compile=True, torch_compile_backend="aot_eager")
    trainer = DistillationTrainer(student, args, teacher=teacher, train_dataset=data, strategy="vanilla")
    assert trainer._passes[1] is not trainer.strategy.student_pass  # the compiled passes
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(p.detach(), q) for p, q in zip(student.parameters(), before))
