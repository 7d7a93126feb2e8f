"""Causal-LM teacher cache end to end on CPU: a tiny Llama teacher (V = 32,000) trained in the test and
saved, ``kdfast teacher-cache build`` over its data, then ``DistillationTrainer(teacher_cache=DIR)`` with
no teacher in memory; top-K gradients against the live teacher's, torchrun shards, and the refusals."""
from __future__ import annotations

import gc
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from causal_fixtures import SEQ_LEN, VOCAB, save_teacher, student
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

from kdfast.apps import causal_teacher_cache_build as causal_build
from kdfast.cache import causal, sparse, store
from kdfast.cache.causal import CausalTeacherCache
from kdfast.cli import main, run_command
from kdfast.data import causal_packing
from kdfast.data.corpus import documents
from kdfast.integrations.transformers import DistillationTrainer, distillation_loss
from kdfast.runtime import distributed
from kdfast.runtime.distributed import Context
from kdfast.runtime.io import write_json

K = 8
MAX_TOKENS = 12 * SEQ_LEN      # 12 sequences


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The saved teacher, its corpus, and a top-K cache built by the CLI at T = 2 from the .jsonl corpus."""
    root = tmp_path_factory.mktemp("causal")
    paths = save_teacher(root)
    out = root / "top"
    assert main(["teacher-cache", "build", "--teacher", str(paths["teacher"]), "--data", str(paths["jsonl"]),
                 "--sparse", f"topk:{K}", "--temperature", "2", "--out", str(out), f"data.seq_len={SEQ_LEN}",
                 f"data.max_tokens={MAX_TOKENS}", "device=cpu"]) == 0
    return {**paths, "root": root, "cache": out}


def args(folder, steps=2):
    return TrainingArguments(output_dir=str(folder), per_device_train_batch_size=4, max_steps=steps,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)


class TeacherScan(TrainerCallback):
    """At every step: the tensors and modules alive in the process that could be the teacher's (its
    64-wide embedding or head [32000, 64], any 64-wide module)."""

    def __init__(self):
        self.found = []

    def on_step_end(self, *_, **__):
        gc.collect()
        with warnings.catch_warnings():   # isinstance on deprecated torch objects warns
            warnings.simplefilter("ignore")
            self._scan()

    def _scan(self):
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and tuple(obj.shape) == (VOCAB, 64):
                self.found.append(("tensor", tuple(obj.shape)))
            elif isinstance(obj, torch.nn.Module) and getattr(getattr(obj, "config", None), "hidden_size", 0) == 64:
                self.found.append(("module", type(obj).__name__))


def test_cli_cache_covers_every_target_position_and_trains_without_a_teacher(built, tmp_path):
    cache = CausalTeacherCache(built["cache"])
    tokenizer = AutoTokenizer.from_pretrained(built["teacher"])
    packed = causal_packing.load([str(built["text"])], tokenizer, SEQ_LEN, MAX_TOKENS)   # the .txt twin of the .jsonl
    index = cache.index
    assert (index["layout"], index["vocab"], index["seq_len"], index["temperature"]) == ("causal", VOCAB, SEQ_LEN, 2.0)
    assert index["sequences"] == packed.shape[0] == 12 and index["target_tokens"] == 12 * (SEQ_LEN - 1)
    dataset = cache.dataset()
    assert torch.equal(torch.stack([dataset[i]["input_ids"] for i in range(len(dataset))]), packed.long())
    assert torch.equal(dataset[3]["labels"], dataset[3]["input_ids"]) and int(dataset[3]["sequence_index"]) == 3
    ids, weights = cache.targets(torch.tensor([0, 5]))
    assert ids.shape == weights.shape == (2, SEQ_LEN - 1, K)
    assert torch.allclose(weights.sum(-1), torch.ones(2, SEQ_LEN - 1))

    gc.collect()
    model = student()
    before = [p.detach().clone() for p in model.parameters()]
    scan = TeacherScan()
    trainer = DistillationTrainer(model, args(tmp_path), teacher_cache=built["cache"], processing_class=tokenizer,
                                  temperature=2.0, kd_weight=1.0, ce_weight=0.5, callbacks=[scan])
    assert trainer.train_dataset is not None and len(trainer.train_dataset) == 12
    result = trainer.train()
    assert math.isfinite(result.training_loss) and result.training_loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scan.found == [], scan.found   # no teacher tensor or module existed during training


def teacher_float64(built):
    return AutoModelForCausalLM.from_pretrained(built["teacher"], dtype=torch.float64).eval()


def param_grads(model, loss) -> torch.Tensor:
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return torch.cat([g.reshape(-1) for g in grads if g is not None]).double()


def dense_kd_on_support(model64, teacher64, batch, temperature, k=None, targets=None):
    """Float64 T²·Σ p̂ (log p̂ - log q) over the targets / N: p̂ = the teacher's top-k renormalised
    (``k``), or dense p (``k`` None), q = softmax(student logits / T)."""
    s = model64(input_ids=batch["input_ids"]).logits[:, :-1].reshape(-1, VOCAB)
    with torch.no_grad():
        t = teacher64(input_ids=batch["input_ids"]).logits[:, :-1].reshape(-1, VOCAB)
    p = F.softmax(t / temperature, -1)
    if k is not None:
        top = p.topk(k, -1)
        p = torch.zeros_like(p).scatter_(1, top.indices, top.values / top.values.sum(1, keepdim=True))
    log_q = F.log_softmax(s / temperature, -1)
    kl = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - log_q), torch.zeros_like(p)).sum()
    return temperature ** 2 * kl / s.shape[0]


def test_topk_gradients_equal_live_topk_kd(built):
    cache = CausalTeacherCache(built["cache"])
    batch = {k: torch.stack([cache.dataset()[i][k] for i in range(4)]) for k in ("input_ids", "labels",
                                                                                 "sequence_index")}
    model = student()
    model64 = student().double()
    model64.load_state_dict(model.state_dict())
    options = dict(temperature=2.0, kd_weight=1.0, ce_weight=0.0, kind="kl")
    cached = distillation_loss(model, None, {"input_ids": batch["input_ids"], "labels": batch["labels"]},
                               teacher_targets=cache.targets(batch["sequence_index"]), **options)
    reference = dense_kd_on_support(model64, teacher_float64(built), batch, 2.0, k=K)
    g_cached, g_ref = param_grads(model, cached.loss), param_grads(model64, reference)
    assert abs(cached.loss.item() - reference.item()) / reference.item() < 1e-5
    assert float((g_cached - g_ref).norm() / g_ref.norm()) < 1e-5
    live_teacher = AutoModelForCausalLM.from_pretrained(built["teacher"]).eval()
    live = distillation_loss(model, live_teacher, {"input_ids": batch["input_ids"], "labels": batch["labels"]},
                             teacher_topk=K, **options)
    g_live = param_grads(model, live.loss)
    assert float((g_cached - g_live).norm() / g_live.norm()) < 1e-5


def test_sample_gradient_error_falls_like_one_over_sqrt_draws(built, tmp_path):
    """Against live full KD (dense p, float64): sample:K caches (r = p, K draws per position) for K = 4..256,
    two seeds each; the log-log slope of the RMS gradient error over K is about -1/2 (scipy fit)."""
    from scipy.stats import linregress

    teacher = AutoModelForCausalLM.from_pretrained(built["teacher"]).eval()
    teacher64 = teacher_float64(built)
    sequences = torch.stack([CausalTeacherCache(built["cache"]).input_ids(i) for i in range(4)])
    batch = {"input_ids": sequences, "labels": sequences}
    model = student()
    model64 = student().double()
    model64.load_state_dict(model.state_dict())
    g_full = param_grads(model64, dense_kd_on_support(model64, teacher64, batch, 1.0))
    draws, errors = (4, 16, 64, 256), []
    for k in draws:
        squared = []
        for seed in (0, 1):
            folder = tmp_path / f"sample-{k}-{seed}"
            causal_build.build(teacher, sequences, folder, sparse.SparseSpec.parse(f"sample:{k}"), 1.0,
                               {"seq_len": SEQ_LEN}, seed=seed)
            cache = CausalTeacherCache(folder)
            out = distillation_loss(model, None, batch, teacher_targets=cache.targets(torch.arange(4)),
                                    ce_weight=0.0, kind="soft_ce")
            squared.append(float((param_grads(model, out.loss) - g_full).norm() ** 2))
        errors.append(math.sqrt(sum(squared) / len(squared)) / float(g_full.norm()))
    fit = linregress([math.log(k) for k in draws], [math.log(e) for e in errors])
    assert -0.75 < fit.slope < -0.3, (errors, fit)
    assert errors[-1] < errors[0] / 3, errors


def test_bytes_per_target_token_at_k32_for_a_128256_vocabulary(tmp_path):
    """Llama 3's V = 128,256: 3-byte ids, float24 weights, 32 entries per target: <= 200 bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = 128_256
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2)).eval()
    with torch.no_grad():
        teacher.lm_head.weight[vocab - 1] *= 100   # the last id (> 2^17) dominates: it must come back exact
    sequences = torch.randint(0, vocab, (4, 128))
    causal_build.build(teacher, sequences, tmp_path, sparse.SparseSpec.parse("topk:32"), 1.0, {"seq_len": 128},
                       batch_size=1)
    cache = CausalTeacherCache(tmp_path)
    assert cache.index["id_bytes"] == 3
    assert cache.index["bytes_per_target_token"] <= 200, cache.index["bytes_per_target_token"]
    assert torch.equal(cache.input_ids(2), sequences[2])
    ids, weights = cache.targets(torch.tensor([3]))
    with torch.no_grad():
        p = torch.softmax(teacher(input_ids=sequences[3:]).logits[:, :-1].float(), -1)
    top = p.topk(32, -1)
    assert torch.equal(ids, top.indices)
    assert torch.allclose(weights, top.values / top.values.sum(-1, keepdim=True), rtol=2e-5, atol=0)


def test_each_rank_builds_its_own_shards(built, tmp_path, monkeypatch):
    teacher = AutoModelForCausalLM.from_pretrained(built["teacher"]).eval()
    single = CausalTeacherCache(built["cache"])
    sequences = torch.stack([single.input_ids(i) for i in range(len(single))])
    spec, fingerprint = sparse.SparseSpec.parse(f"topk:{K}"), single.index["fingerprint"]
    monkeypatch.setattr(distributed, "barrier", lambda context: None)
    for rank in (1, 0):   # rank 0 writes cache.json from both ranks' reports
        causal_build.build(teacher, sequences, tmp_path, spec, 2.0, fingerprint, Context(rank, 2), batch_size=4)
    sharded = CausalTeacherCache(tmp_path)
    assert {e["file"] for e in sharded.index["shards"]} == {store.shard_name(0, 0), store.shard_name(1, 0)}
    assert sharded.index["world_size"] == 2 and len(sharded) == len(single)
    index = torch.arange(len(single))
    assert torch.equal(sharded.targets(index)[0], single.targets(index)[0])
    assert torch.allclose(sharded.targets(index)[1], single.targets(index)[1], rtol=1e-5, atol=0)


def test_a_cache_for_another_tokenizer_teacher_or_length_is_refused_naming_the_field(built, tmp_path, capsys):
    other_teacher = tmp_path / "other"
    student().save_pretrained(other_teacher)
    AutoTokenizer.from_pretrained(built["teacher"]).save_pretrained(other_teacher)
    with pytest.raises(ValueError, match="different teacher"):
        CausalTeacherCache(built["cache"], teacher=other_teacher)
    CausalTeacherCache(built["cache"], teacher=built["teacher"], seq_len=SEQ_LEN)   # the right ones pass
    with pytest.raises(ValueError, match="different seq_len: expected 24, got 16"):
        CausalTeacherCache(built["cache"], seq_len=24)
    from causal_fixtures import build_tokenizer
    from trainer_fixtures import write_corpus

    other_tokenizer = build_tokenizer(write_corpus(tmp_path, characters=3_000), tokens=300)
    with pytest.raises(ValueError, match="different tokenizer"):
        DistillationTrainer(student(), args(tmp_path), teacher_cache=built["cache"], processing_class=other_tokenizer,
                            temperature=2.0)
    def rebuild(teacher, seq_len):
        return main(["teacher-cache", "build", "--teacher", str(teacher), "--data", str(built["jsonl"]), "--sparse",
                     f"topk:{K}", "--temperature", "2", "--out", str(built["cache"]), f"data.seq_len={seq_len}",
                     f"data.max_tokens={MAX_TOKENS}", "device=cpu"])

    assert rebuild(other_teacher, SEQ_LEN) == 2
    assert "kdfast: error: teacher cache: " in capsys.readouterr().err   # one line, no traceback
    with pytest.raises(ValueError, match="different teacher"):
        run_command(["teacher-cache", "build", "--teacher", str(other_teacher), "--data", str(built["jsonl"]),
                     "--sparse", f"topk:{K}", "--temperature", "2", "--out", str(built["cache"]),
                     f"data.seq_len={SEQ_LEN}", f"data.max_tokens={MAX_TOKENS}", "device=cpu"])
    assert rebuild(built["teacher"], 12) == 2
    assert "different seq_len: expected 12, got 16" in capsys.readouterr().err
    assert rebuild(built["teacher"], SEQ_LEN) == 0   # the same inputs reuse it


def test_datasets_the_cache_cannot_serve_are_refused(built, tmp_path):
    cache = CausalTeacherCache(built["cache"])
    examples = [cache.dataset()[i] for i in range(len(cache))]
    with pytest.raises(ValueError, match=f"targets for all {len(cache) + 1} sequences of train_dataset, got a cache "
                                         f"of {len(cache)}"):
        DistillationTrainer(student(), args(tmp_path), teacher_cache=cache, train_dataset=examples + examples[:1],
                            temperature=2.0)
    shorter = [{k: (v[:-2] if v.dim() else v) for k, v in e.items()} for e in examples]
    with pytest.raises(ValueError, match=f"different seq_len: expected {SEQ_LEN - 2}, got {SEQ_LEN}"):
        DistillationTrainer(student(), args(tmp_path), teacher_cache=cache, train_dataset=shorter, temperature=2.0)
    shifted = [{**e, "sequence_index": (e["sequence_index"] + 1) % len(cache)} for e in examples]
    trainer = DistillationTrainer(student(), args(tmp_path, 1), teacher_cache=cache, train_dataset=shifted,
                                  temperature=2.0)
    with pytest.raises(ValueError, match="input_ids: expected the tokens the cache was built from"):
        trainer.train()
    with pytest.raises(ValueError, match="temperature: expected the cache's T=2"):
        DistillationTrainer(student(), args(tmp_path), teacher_cache=cache)
    with pytest.raises(ValueError, match="teacher: expected None with teacher_cache"):
        DistillationTrainer(student(), args(tmp_path), teacher=student(), teacher_cache=cache, temperature=2.0)
    batch = {"input_ids": examples[0]["input_ids"][None], "labels": examples[0]["labels"][None]}
    ids, weights = cache.targets(torch.tensor([0]))
    with pytest.raises(ValueError, match=r"teacher_targets: expected \(ids, weights\) of shape \[B, L', K\]"):
        distillation_loss(student(), None, batch, teacher_targets=(ids[:, 1:], weights[:, 1:]), temperature=2.0)


def test_a_masked_lm_cache_folder_is_refused(tmp_path):
    write_json(tmp_path / store.INDEX, {"format": store.FORMAT, "fingerprint": {}, "shards": []})
    with pytest.raises(ValueError, match="teacher_cache: expected a cache built from a causal LM"):
        CausalTeacherCache(tmp_path)


def test_jsonl_and_causal_packing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match="'text' string on each line of .*bad.jsonl.*line 2"):
        list(documents([str(bad)]))
    from causal_fixtures import build_tokenizer
    from trainer_fixtures import write_corpus

    tokenizer = build_tokenizer(write_corpus(tmp_path, characters=3_000))
    packed = causal_packing.pack(["one two three", "four five"] * 20, tokenizer, 8)
    flat = packed.reshape(-1).tolist()
    assert flat[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in flat[:12]
    with pytest.raises(ValueError, match="seq_len: expected an int >= 2"):
        causal_packing.pack(["x"], tokenizer, 1)
    assert causal.LAYOUT == "causal"


def test_docs_causal_commands_and_training_run_as_written(built, tmp_path, monkeypatch):
    """docs/teacher_cache.md's causal blocks, verbatim, beside a folder `llama-teacher` and `corpus.jsonl`."""
    import re
    import shlex
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "teacher_cache.md").read_text()
    commands = re.search(r"<!-- tested: causal commands -->\n```bash\n(.*?)```", doc, re.S).group(1)
    training = re.search(r"<!-- tested: causal training -->\n```python\n(.*?)```", doc, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llama-teacher").symlink_to(built["teacher"])
    (tmp_path / "corpus.jsonl").symlink_to(built["jsonl"])
    for line in commands.replace("\\\n", " ").splitlines():
        argv = shlex.split(line)
        assert argv[:3] == ["kdfast", "teacher-cache", "build"]
        assert main(argv[1:]) == 0
    assert CausalTeacherCache("cache-sample32").index["proposal"]["tau"] == 1.0
    exec(compile(training, "docs/teacher_cache.md: causal training", "exec"), {"__name__": "__doc_example__"})
