"""kdfast.integrations.trl: TRL's GKDTrainer and DistillationTrainer with kdfast's fused loss, on tiny
Llama models built here, against TRL's own losses (float64 where the reference is TRL's formula)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed (pip install 'kdfast[trl]')")
pytest.importorskip("trl.experimental.gkd", reason="this TRL has no trl.experimental.gkd.GKDTrainer")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from kdfast.bench.measure import rel_err  # noqa: E402
from kdfast.integrations.trl import (  # noqa: E402
    TESTED_TRL,
    KDFastDistillationTrainer,
    KDFastGKDTrainer,
    check_trl_version,
    generalized_jsd_loss,
    trl_divergence,
)

VOCAB, PAD, EOS = 61, 0, 1


def tokenizer() -> PreTrainedTokenizerFast:
    """Words ``w2`` .. ``w60`` as ids 2 .. 60, left padding (TRL generates from left-padded prompts)."""
    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   padding_side="left")


def tiny_llama(width: int, seed: int, tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=width, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, intermediate_size=2 * width,
                                        max_position_embeddings=64, tie_word_embeddings=tied, initializer_range=0.3,
                                        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None))


def gkd_batch(seed: int = 0) -> dict:
    """Left-padded prompts (-100) then completions of 3..7 tokens, right-padded: GKD's layout."""
    gen = torch.Generator().manual_seed(seed)
    rows, length = 4, 13
    ids = torch.randint(2, VOCAB, (rows, length), generator=gen)
    attention = torch.ones(rows, length, dtype=torch.long)
    labels = ids.clone()
    for row in range(rows):
        pad, prompt, completion = row % 3, 3 + row % 2, 3 + row
        attention[row, :pad] = 0
        attention[row, pad + prompt + completion:] = 0
        labels[row, :pad + prompt] = -100
    ids = ids.masked_fill(attention == 0, PAD)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels.masked_fill(attention == 0, -100)}


def trl_reference(student, teacher, batch: dict, beta: float, temperature: float, num_items) -> torch.Tensor:
    """TRL's GKDTrainer.generalized_jsd_loss on the models' full logits, in float64."""
    model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    student_logits = student(**model_inputs).logits.double()
    with torch.no_grad():
        teacher_logits = teacher(**model_inputs).logits.double()
    return GKDTrainer.generalized_jsd_loss(student_logits[:, :-1], teacher_logits[:, :-1], batch["labels"][:, 1:],
                                           beta=beta, temperature=temperature, num_items_in_batch=num_items)


def student_grads(student, loss: torch.Tensor) -> torch.Tensor:
    student.zero_grad()
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in student.parameters() if p.grad is not None])


# (backend, temperature, LM-head scale, num_items_in_batch). Head scale 12 gives logits of several tens
# (peaked distributions); the torch backend's JSD gradients miss 1e-5 there (issue #21, Precision).
LOSS_CASES = [("cpu", 1.0, 1.0, None), ("torch", 1.0, 1.0, None), ("cpu", 2.5, 1.0, 40), ("torch", 2.5, 1.0, 40),
              ("cpu", 0.7, 12.0, None)]


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("backend, temperature, head_scale, num_items", LOSS_CASES)
def test_loss_equals_trl_generalized_jsd(backend, beta, temperature, head_scale, num_items):
    student, teacher = tiny_llama(16, seed=0, tied=True), tiny_llama(24, seed=1)
    with torch.no_grad():
        student.lm_head.weight.mul_(head_scale)
        teacher.lm_head.weight.mul_(head_scale)
    batch = gkd_batch()
    ours = generalized_jsd_loss(student, teacher, batch, beta=beta, temperature=temperature,
                                num_items_in_batch=num_items, backend=backend)
    grads = student_grads(student, ours)
    ref = trl_reference(student, teacher, batch, beta, temperature, num_items)
    ref_grads = student_grads(student, ref)
    assert ref.item() > 0
    assert rel_err(ours, ref) < 1e-5
    assert rel_err(grads, ref_grads) < 1e-5


def test_trl_beta_convention():
    assert trl_divergence(0.0) == {"kind": "kl"}
    assert trl_divergence(1.0) == {"kind": "reverse_kl"}
    assert trl_divergence(0.25) == {"kind": "jsd", "beta": 0.25}
    with pytest.raises(ValueError, match="beta"):
        trl_divergence(1.5)


def test_no_target_tokens_gives_zero():
    student, teacher = tiny_llama(16, seed=0), tiny_llama(24, seed=1)
    batch = gkd_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss = generalized_jsd_loss(student, teacher, batch, beta=0.5)
    assert loss.item() == 0.0


def prompts_collator(rows: list[dict]) -> dict:
    """GKD's batch from token-id prompts, left-padded; labels = the prompts (replaced by generation)."""
    width = max(len(row["prompt"]) for row in rows)
    prompts = torch.tensor([[PAD] * (width - len(row["prompt"])) + row["prompt"] for row in rows])
    mask = torch.tensor([[0] * (width - len(row["prompt"])) + [1] * len(row["prompt"]) for row in rows])
    return {"input_ids": prompts, "attention_mask": mask, "labels": prompts.masked_fill(mask == 0, -100),
            "prompts": prompts, "prompt_attention_mask": mask}


def prompt_ids(count: int) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    return Dataset.from_list([{"prompt": torch.randint(2, VOCAB, (3 + i % 3,), generator=gen).tolist()}
                              for i in range(count)])


def run_args(tmp_path, bf16: bool = False) -> dict:
    """Three steps on CPU; fp32 unless ``bf16`` (TRL's configs default to bf16 autocast)."""
    return dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[], logging_steps=1,
                use_cpu=True, save_strategy="no", learning_rate=1e-2, seed=0, bf16=bf16)


class RecordingGKDTrainer(KDFastGKDTrainer):
    """Records, per step, kdfast's loss, TRL's own compute_loss on the same batch, and the batch."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with torch.no_grad():
            trl_loss = GKDTrainer.compute_loss(self, model, inputs, num_items_in_batch=num_items_in_batch)
        self.records.append((loss.detach().clone(), trl_loss, {k: v.clone() for k, v in inputs.items()}))
        return loss


@pytest.mark.parametrize("beta, bf16, tolerance", [(0.4, False, 1e-5), (1.0, False, 1e-5), (0.4, True, 2e-2)])
def test_gkd_trainer_on_policy_steps_match_trl(tmp_path, beta, bf16, tolerance):
    student, teacher = tiny_llama(16, seed=0), tiny_llama(24, seed=1)
    before = student.lm_head.weight.detach().clone()
    args = GKDConfig(lmbda=1.0, beta=beta, temperature=0.9, max_new_tokens=6, **run_args(tmp_path, bf16))
    trainer = RecordingGKDTrainer(model=student, teacher_model=teacher, args=args, data_collator=prompts_collator,
                                  train_dataset=prompt_ids(12), processing_class=tokenizer())
    trainer.records = []
    trainer.train()
    assert trainer.state.global_step == 3 and len(trainer.records) == 3
    ours, trl_loss, batch = trainer.records[0]
    assert rel_err(ours, trl_loss) < tolerance
    # On-policy: the batch holds the student's completions after the prompts, and only they are targets.
    prompt_width = batch["prompts"].shape[1]
    assert batch["input_ids"].shape[1] > prompt_width
    assert (batch["labels"][:, :prompt_width] == -100).all() and (batch["labels"][:, prompt_width:] != -100).any()
    assert all(torch.isfinite(loss) for loss, _, _ in trainer.records)
    assert not torch.equal(before, student.lm_head.weight)


class RecordingDistillationTrainer(KDFastDistillationTrainer):
    """Records, per step, kdfast's loss and TRL's own chunked loss on the same generated batch."""

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        loss, entropy, n_valid = super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        with torch.no_grad():
            trl_loss = DistillationTrainer._compute_loss(self, unwrapped_student, inputs, num_items_in_batch)[0]
        self.records.append((loss.detach().clone(), trl_loss, n_valid))
        return loss, entropy, n_valid


@pytest.mark.parametrize("beta, temperature", [(0.0, 1.5), (0.3, 0.8)])
def test_distillation_trainer_steps_match_trl(tmp_path, beta, temperature):
    student, teacher = tiny_llama(16, seed=0), tiny_llama(24, seed=1)
    prompts = Dataset.from_list([{"prompt": " ".join(f"w{2 + (5 * i + j) % 59}" for j in range(3 + i % 3))}
                                 for i in range(12)])
    args = DistillationConfig(beta=beta, temperature=temperature, max_completion_length=6, **run_args(tmp_path))
    trainer = RecordingDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                           processing_class=tokenizer())
    trainer.records = []
    trainer.train()
    assert trainer.state.global_step == 3 and len(trainer.records) == 3
    ours, trl_loss, n_valid = trainer.records[0]
    assert n_valid > 0 and ours.item() > 0
    assert rel_err(ours, trl_loss) < 1e-5


def test_version_outside_tested_range_warns():
    with pytest.warns(UserWarning, match=re.escape(f"tested with trl{TESTED_TRL}, got trl 0.9.6")):
        assert check_trl_version("0.9.6") is False
    with pytest.warns(UserWarning, match="got trl 2.0.0"):
        assert check_trl_version("2.0.0") is False


def test_import_with_trl_outside_range_warns_and_works(monkeypatch):
    import importlib

    import trl

    import kdfast.integrations.trl as module
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.warns(UserWarning, match=re.escape(f"tested with trl{TESTED_TRL}, got trl 1.17.0")):
        importlib.reload(module)
    assert issubclass(module.KDFastGKDTrainer, GKDTrainer)
    monkeypatch.undo()
    importlib.reload(module)


def test_installed_version_in_range_is_quiet(recwarn):
    assert check_trl_version() is True
    assert not [w for w in recwarn if "kdfast.integrations.trl" in str(w.message)]


def test_distillation_trainer_needs_a_teacher(tmp_path):
    args = DistillationConfig(max_completion_length=4, **run_args(tmp_path))
    prompts = Dataset.from_list([{"prompt": "w2 w3"}] * 4)
    with pytest.raises(ValueError, match="teacher_model"):
        KDFastDistillationTrainer(model=tiny_llama(16, seed=0), teacher_model=None, args=args,
                                  train_dataset=prompts, processing_class=tokenizer())


def test_docs_example_runs(tmp_path, monkeypatch):
    """The block of docs/losses.md marked ``<!-- tested with trl -->`` runs as written."""
    doc = Path(__file__).resolve().parents[1] / "docs" / "losses.md"
    blocks = re.findall(r"^<!-- tested with trl -->\n```python\n(.*?)^```", doc.read_text(), re.S | re.M)
    assert len(blocks) == 1 and "KDFastDistillationTrainer" in blocks[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], f"{doc}:trl block", "exec"), {"__name__": "__doc_example__"})
