"""FLOPs of one training step: analytic from the model configs, and measured with FlopCounterMode.

Conventions (docs/budget.md): a multiply-add is 2 FLOPs; backward costs twice the forward's
matmuls; elementwise work is counted only inside kdfast losses, at the per-element constants below
(FlopCounterMode counts no elementwise aten op either).

Analytic, per step of ``batch`` sequences of ``seq`` tokens with ``mlm_rows`` masked positions:
- student: 3 x (encoder forward [+ MLM head on the masked positions when it trains MLM]);
  encoder forward per token and layer = 2 x (4H^2 + 2HI) for the projections and MLP plus
  4 x seq x H for QK^T and AV;
- teacher: 1 x (encoder forward [+ MLM head on the KD rows for vocabulary KD]);
- kd_loss: the strategy's loss terms (paper set-ups; see ``kd_loss_flops``).

Measured: every aten matmul/attention op through FlopCounterMode, plus every kdfast loss op, which
:func:`measure_flops` routes through a marker op ``kdfast_flops::<op>_<direction>`` whose
registered formula is :data:`OP_FLOPS` (kernel backends are opaque to the counter and would count 0;
the work a torch-reference backend does inside the op is not counted twice).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import _disable_current_modes

from kdfast import _backends
from kdfast.budget.observe import observe_ops
from kdfast.strategies import STRATEGIES, Strategy

KL_FWD, KL_BWD = 12, 4     # per logit: two temperature softmaxes and the KL sum / the (q - p) gradient
CE_FWD, CE_BWD = 5, 2      # per logit: one softmax and the label term / softmax - one-hot
MSE_FWD, MSE_BWD = 3, 2    # per element: difference, square, sum / 2 x difference


# --- formulas on shapes, shared by the analytic count and the kdfast op formulas -------------------

def score_pairs_flops(matrices: float, length: int, d_s: int, d_t: int, ew_fwd: int, ew_bwd: int) -> tuple:
    """(forward, backward) FLOPs of a loss between ``matrices`` student and teacher [L, L] score
    matrices built from [L, d_s] / [L, d_t] operands (attention KL, relations, score MSE)."""
    cells = matrices * length * length
    return 2 * cells * (d_s + d_t) + ew_fwd * cells, 4 * cells * d_s + ew_bwd * cells


def vocab_flops(kd_rows: float, mlm_rows: float, vocab: int, h_s: int, h_t: int) -> tuple:
    """(forward, backward) FLOPs of fused vocabulary KD + MLM: both heads' logits on the rows used,
    KL on the KD rows, cross-entropy on the MLM rows."""
    rows = max(kd_rows, mlm_rows)
    fwd = 2 * rows * vocab * h_s + 2 * kd_rows * vocab * h_t + (KL_FWD * kd_rows + CE_FWD * mlm_rows) * vocab
    bwd = 4 * rows * vocab * h_s + (KL_BWD * kd_rows + CE_BWD * mlm_rows) * vocab
    return fwd, bwd


def hidden_flops(rows: float, h_s: int, h_t: int, projected: bool) -> tuple:
    """(forward, backward) FLOPs of a hidden-state MSE, with an optional [Ht, Hs] projection."""
    matmul = 2 * rows * h_s * h_t if projected else 0
    return matmul + MSE_FWD * rows * h_t, 2 * matmul + MSE_BWD * rows * h_t


# --- kdfast op formulas (kwargs as validated by the public functions) ------------------------------

def _rows(mask) -> int:
    return int(mask.sum())


def _kd_kl(kw) -> tuple:
    n, vocab = kw["student_logits"].shape
    rows = n if kw.get("mask") is None else _rows(kw["mask"])
    return KL_FWD * rows * vocab, KL_BWD * rows * vocab


def _fused_linear_kd(kw) -> tuple:
    n, h_s = kw["student_hidden"].shape
    labels, mask = kw.get("labels"), kw.get("mask")
    labelled = None if labels is None else _rows(labels != kw["ignore_index"])
    kd_rows = 0 if not kw["kd_weight"] else _rows(mask) if mask is not None else n if labelled is None else labelled
    mlm_rows = labelled if labelled is not None and kw["mlm_weight"] else 0
    teacher = kw.get("teacher_hidden")  # None with cached sparse targets: no teacher head
    h_t = 0 if teacher is None else teacher.shape[1]
    return vocab_flops(kd_rows, mlm_rows, kw["student_weight"].shape[0], h_s, h_t)


def _attention(kw, ew_fwd: int, ew_bwd: int) -> tuple:
    b, h, length, d_s = kw["q_s"].shape
    return score_pairs_flops(b * h, length, d_s, kw["q_t"].shape[-1], ew_fwd, ew_bwd)


def _relation_kl(kw) -> tuple:
    b, length, h_s = kw["x_s"].shape
    r = kw["num_relation_heads"]
    return score_pairs_flops(b * r, length, h_s // r, kw["x_t"].shape[-1] // r, KL_FWD, KL_BWD)


def _hidden_mse(kw) -> tuple:
    h_s, h_t = kw["h_s"], kw["h_t"]
    rows = h_s.numel() // h_s.shape[-1] if kw.get("mask") is None else _rows(kw["mask"])
    return hidden_flops(rows, h_s.shape[-1], h_t.shape[-1], kw.get("weight") is not None)


OP_FLOPS: dict[str, Callable[[dict], tuple]] = {
    "kd_kl": _kd_kl,
    "fused_linear_kd": _fused_linear_kd,
    "attention_kl": lambda kw: _attention(kw, KL_FWD, KL_BWD),
    "relation_kl": _relation_kl,
    "attention_score_mse": lambda kw: _attention(kw, MSE_FWD, MSE_BWD),
    "hidden_mse": _hidden_mse,
}
assert set(OP_FLOPS) == set(_backends.OPS), "every kdfast op needs a FLOP formula"


# --- marker ops: how FlopCounterMode learns what a kdfast op cost ---------------------------------

_LIBRARY = torch.library.Library("kdfast_flops", "DEF")


def _marker_formula(anchor, flops, out_val=None) -> int:
    return flops


for _op in OP_FLOPS:
    for _direction in ("forward", "backward"):
        _LIBRARY.define(f"{_op}_{_direction}(Tensor anchor, int flops) -> ()")
        _LIBRARY.impl(f"{_op}_{_direction}", lambda anchor, flops: None, "CompositeExplicitAutograd")
        flop_counter.register_flop_formula(getattr(torch.ops.kdfast_flops, f"{_op}_{_direction}"),
                                           get_raw=True)(_marker_formula)


@contextlib.contextmanager
def _count_kdfast_op(op: str, direction: str, kwargs: dict):
    """Hide the op's own aten calls from the counter, then report the formula's count."""
    with _disable_current_modes():
        yield
    flops = OP_FLOPS[op](kwargs)[0 if direction == "forward" else 1]
    getattr(torch.ops.kdfast_flops, f"{op}_{direction}")(torch.empty(0), int(flops))


# CPU scaled-dot-product attention has no formula in torch's registry (it would count 0).
def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


EXTRA_ATEN_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def measure_flops(fn: Callable[[], object]) -> dict:
    """Run ``fn()`` once under FlopCounterMode; returns ``{"total": int, "by_op": {name: int}}``."""
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=EXTRA_ATEN_FORMULAS)
    with counter, observe_ops(_count_kdfast_op):
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"total": int(counter.get_total_flops()), "by_op": by_op}


# --- analytic model -------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncoderShape:
    """A BERT encoder with an MLM head: L layers of width H, h heads, MLP width I, vocabulary V,
    ``positions`` position embeddings."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    positions: int = 512

    @classmethod
    def of(cls, config) -> "EncoderShape":
        """From a transformers ``BertConfig`` (or anything with its attribute names)."""
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   config.intermediate_size, config.vocab_size, config.max_position_embeddings)

    @property
    def params(self) -> int:
        """All parameters, approximately: layers, head transform and embeddings (the decoder is tied to
        the word embeddings; biases and norms are left out)."""
        return self.matmul_params + self.hidden ** 2 + (self.vocab + self.positions) * self.hidden

    @property
    def matmul_params(self) -> int:
        """Weights used in matmuls per token: encoder layers (embeddings are lookups)."""
        return self.layers * (4 * self.hidden ** 2 + 2 * self.hidden * self.intermediate)

    @property
    def head_params(self) -> int:
        """MLM head: the H x H transform and the tied V x H decoder."""
        return self.hidden ** 2 + self.vocab * self.hidden

    def encoder_forward(self, tokens: float, seq: int) -> float:
        return tokens * (2 * self.matmul_params + 4 * self.layers * seq * self.hidden)

    def head_forward(self, rows: float) -> float:
        return 2 * rows * self.head_params


def strategy_class(name: str) -> type[Strategy]:
    """The ``Strategy`` class of ``name``, whose attributes say what a step of it runs."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {name!r}")
    return STRATEGIES[name]


def kd_loss_flops(strategy: str, teacher: EncoderShape, student: EncoderShape, batch: int, seq: int,
                  mlm_rows: float, relation_heads: int = 12) -> float:
    """Forward + backward FLOPs of a strategy's distillation terms beyond the two models:
    vanilla: KL on the MLM rows; distilbert: + a last-layer hidden cosine (counted as an MSE);
    tinybert: attention-score MSE on every student layer and a projected hidden MSE on every layer
    plus the embeddings; minilm: last-layer attention KL + value relation; minilm_v2: Q, K, V
    relations of the last layer with ``relation_heads`` heads."""
    tokens = batch * seq
    d_s, d_t = student.hidden // student.heads, teacher.hidden // teacher.heads
    if strategy == "no-kd":
        return 0.0
    kind = strategy_class(strategy)
    if kind.vocab_kd:
        total = (KL_FWD + KL_BWD) * mlm_rows * student.vocab
        if strategy == "distilbert":
            total += sum(hidden_flops(tokens, student.hidden, teacher.hidden, projected=False))
        return float(total)
    if strategy == "tinybert":
        scores = sum(score_pairs_flops(batch * student.heads, seq, d_s, d_t, MSE_FWD, MSE_BWD))
        hidden = sum(hidden_flops(tokens, student.hidden, teacher.hidden, projected=True))
        return float(student.layers * scores + (student.layers + 1) * hidden)
    if strategy == "minilm":
        return float(2 * sum(score_pairs_flops(batch * student.heads, seq, d_s, d_t, KL_FWD, KL_BWD)))
    if strategy == "minilm_v2":
        r = relation_heads
        return float(3 * sum(score_pairs_flops(batch * r, seq, student.hidden // r, teacher.hidden // r,
                                               KL_FWD, KL_BWD)))
    raise ValueError(f"strategy: expected a strategy with a FLOP formula in kd_loss_flops, got {strategy!r}")


def analytic_step_flops(strategy: str, teacher: EncoderShape, student: EncoderShape, batch: int, seq: int,
                        mlm_probability: float = 0.15, relation_heads: int = 12,
                        student_mlm: Optional[bool] = None) -> dict:
    """FLOPs of one step of ``batch`` x ``seq`` tokens: ``{"student", "teacher_forward", "kd_loss",
    "total"}``. ``student_mlm``: whether the student trains its MLM head (default: no-kd, vanilla and
    distilbert do; tinybert, minilm and minilm_v2 do not)."""
    tokens, mlm_rows = batch * seq, mlm_probability * batch * seq
    kd_loss = kd_loss_flops(strategy, teacher, student, batch, seq, mlm_rows, relation_heads)  # validates the name
    if student_mlm is None:
        student_mlm = strategy_class(strategy).trains_mlm_head
    student_flops = 3 * (student.encoder_forward(tokens, seq) + (student.head_forward(mlm_rows) if student_mlm else 0))
    teacher_flops = 0.0
    if strategy_class(strategy).uses_teacher:
        teacher_flops = teacher.encoder_forward(tokens, seq)
        if strategy_class(strategy).vocab_kd:
            teacher_flops += teacher.head_forward(mlm_rows)
    return {"student": student_flops, "teacher_forward": teacher_flops, "kd_loss": kd_loss,
            "total": student_flops + teacher_flops + kd_loss}


# BERT's recipe: 1M steps of 256 sequences, 90% of them at length 128 and 10% at 512.
BERT_PRETRAINING = ((900_000, 256, 128), (100_000, 256, 512))


def teacher_cache_flops(teacher: EncoderShape, tokens: float, seq: int, mlm_probability: float = 0.15) -> float:
    """Analytic FLOPs of building a teacher cache: one teacher forward over ``tokens`` corpus tokens
    plus its MLM head on the masked positions."""
    return teacher.encoder_forward(tokens, seq) + teacher.head_forward(mlm_probability * tokens)


def pretraining_flops(model: EncoderShape, recipe=BERT_PRETRAINING, mlm_probability: float = 0.15) -> float:
    """Analytic FLOPs of pretraining ``model`` with MLM on ``recipe`` = ((steps, batch, seq), ...)."""
    return sum(steps * analytic_step_flops("no-kd", model, model, batch, seq, mlm_probability)["total"]
               for steps, batch, seq in recipe)
