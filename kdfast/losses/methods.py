"""The losses of published distillation methods (DistilBERT, TinyBERT, MiniLM v1/v2), composed from the
public fused losses; the trainer strategies of ``kdfast/strategies/`` call them.

Each takes tapped tensors and ``formulation="canonical"`` (the method's official code) or
``"paper"`` (the fixed-budget study's re-implementation); docs/losses.md writes every one as a
formula with its source. Shapes: B batch, L length, h heads, d head size, H hidden width,
V vocabulary; ``attention_mask`` [B, L] is True (1) on real tokens, ``labels`` [B, L] hold the MLM
targets or ``ignore_index``. Per-layer inputs are sequences indexed by layer (0-based for
attention layers; for hidden states 0 = embeddings, i = output of layer i); entries a
formulation does not read may be None. Every term runs on ``backend`` ("auto" = fastest).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdfast import _checks as check
from kdfast.losses.attention import attention_kl, attention_score_mse, relation_kl
from kdfast.losses.hidden import hidden_mse
from kdfast.losses.vocab import fused_linear_kd

FORMULATIONS = ("canonical", "paper")


class StrategyLoss(NamedTuple):
    """``loss`` = the sum of ``parts`` (name -> 0-dim tensor, the source's weights already
    applied, see docs/losses.md); ``mlm`` = the unweighted MLM cross-entropy when the loss has one."""

    loss: torch.Tensor
    parts: dict
    mlm: Optional[torch.Tensor] = None


def _total(parts: dict, mlm: Optional[torch.Tensor] = None) -> StrategyLoss:
    terms = list(parts.values())
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return StrategyLoss(total, parts, mlm)


def _flat_mask(attention_mask: Optional[torch.Tensor], shape: tuple) -> Optional[torch.Tensor]:
    """[B, L] -> [B*L] bool (None stays None)."""
    if attention_mask is None:
        return None
    check.shape("attention_mask", attention_mask, shape, "[B, L]")
    return attention_mask.reshape(-1).bool()


def _needed(name: str, values: Sequence[Optional[torch.Tensor]], index: int) -> torch.Tensor:
    if not -len(values) <= index < len(values) or values[index] is None:
        have = [i for i, v in enumerate(values) if v is not None]
        raise ValueError(f"{name}[{index}]: expected a tensor (this formulation reads it), "
                         f"got {'None' if -len(values) <= index < len(values) else 'no such entry'}; "
                         f"present entries: {have} of {len(values)}")
    return values[index]


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """Half precision -> float32 (float32/float64 unchanged)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cosine_hidden_loss(h_s: torch.Tensor, h_t: torch.Tensor,
                       attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DistilBERT's cosine embedding loss: mean over kept tokens of 1 - cos(h_s, h_t), [B, L, H] each."""
    check.tensor("student_last_hidden", h_s, ndim=3)
    check.tensor("teacher_last_hidden", h_t, ndim=3)
    if h_t.shape != h_s.shape:
        raise ValueError(f"teacher_last_hidden: expected shape {tuple(h_s.shape)} (the cosine term needs equal "
                         f"widths; use formulation='paper' or a student as wide as the teacher), "
                         f"got {tuple(h_t.shape)}")
    keep = _flat_mask(attention_mask, tuple(h_s.shape[:2]))
    s, t = h_s.reshape(-1, h_s.shape[-1]), h_t.detach().reshape(-1, h_t.shape[-1])
    dtype = torch.promote_types(_fp32(s).dtype, _fp32(t).dtype)
    if keep is not None and torch.compiler.is_compiling():  # every row, padding weighted 0: shapes stay static
        cos = F.cosine_similarity(s.to(dtype), t.to(dtype), dim=-1)
        return ((1 - cos) * keep).sum() / keep.sum().clamp_min(1)
    if keep is not None:
        s, t = s[keep], t[keep]
    cos = F.cosine_similarity(s.to(dtype), t.to(dtype), dim=-1)
    return (1 - cos).sum() / max(cos.numel(), 1)


def distilbert(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
               teacher_weight: torch.Tensor, labels: torch.Tensor, student_bias: Optional[torch.Tensor] = None,
               teacher_bias: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
               student_last_hidden: Optional[torch.Tensor] = None,
               teacher_last_hidden: Optional[torch.Tensor] = None, formulation: str = "canonical",
               ignore_index: int = -100, backend: str = "auto") -> StrategyLoss:
    """DistilBERT from pre-decoder states ``*_hidden`` [B, L, H] and LM heads ``*_weight`` [V, H].

    canonical (huggingface/transformers examples/research_projects/distillation):
      5 * T^2 * KL(p_t^T || q_s^T) (T=2, batchmean over non-pad tokens) + 2 * MLM
      + 1 * mean_{non-pad}(1 - cos(last_s, last_t)); parts ``kd``, ``mlm``, ``cos``.
    paper: soft CE at T=1 with reduction "mean" (over masked rows x V) on masked positions + MLM;
      parts ``kd``, ``mlm``.
    """
    check.choice("formulation", formulation, FORMULATIONS)
    check.tensor("student_hidden", student_hidden, ndim=3)
    check.tensor("teacher_hidden", teacher_hidden, ndim=3)
    bl = tuple(student_hidden.shape[:2])
    check.tensor("labels", labels, ndim=2, dtypes=(torch.int64, torch.int32))
    check.shape("labels", labels, bl, "[B, L]")
    flat_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    flat_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    common = dict(student_bias=student_bias, teacher_bias=teacher_bias, labels=labels.reshape(-1),
                  ignore_index=ignore_index, backend=backend)
    if formulation == "paper":
        out = fused_linear_kd(flat_s, student_weight, flat_t, teacher_weight, temperature=1.0, kd_weight=1.0,
                              mlm_weight=1.0, kind="soft_ce", reduction="mean", **common)
        return _total({"kd": out.kd, "mlm": out.mlm}, out.mlm)
    if student_last_hidden is None or teacher_last_hidden is None:
        raise ValueError("student_last_hidden/teacher_last_hidden: expected [B, L, H] last hidden states for the "
                         "canonical cosine term, got None")
    rows = _flat_mask(attention_mask, bl)
    if rows is None:
        rows = torch.ones(flat_s.shape[0], dtype=torch.bool, device=flat_s.device)
    out = fused_linear_kd(flat_s, student_weight, flat_t, teacher_weight, temperature=2.0, kd_weight=1.0,
                          mlm_weight=1.0, kind="kl", reduction="batchmean", t2_scale=True, mask=rows, **common)
    cos = cosine_hidden_loss(student_last_hidden, teacher_last_hidden, attention_mask)
    return _total({"kd": 5.0 * out.kd, "mlm": 2.0 * out.mlm, "cos": 1.0 * cos}, out.mlm)


def tinybert_layer_map(student_layers: int, teacher_layers: int, formulation: str = "canonical"
                       ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(attention pairs, hidden pairs) of (student index, teacher index) that ``tinybert`` reads.

    canonical: attention i <-> (i+1)k - 1 (0-based layers), hidden i <-> i k (0 = embeddings),
    k = teacher_layers // student_layers. paper: attention of the last layers and of the first
    layers (the "embedding" term), hidden of the last layers.
    """
    check.choice("formulation", formulation, FORMULATIONS)
    if not 0 < student_layers <= teacher_layers:
        raise ValueError(f"student_layers: expected 1..teacher_layers={teacher_layers} for TinyBERT's layer map, "
                         f"got {student_layers}")
    if formulation == "paper":
        return [(student_layers - 1, teacher_layers - 1), (0, 0)], [(student_layers, teacher_layers)]
    k = teacher_layers // student_layers
    return ([(i, (i + 1) * k - 1) for i in range(student_layers)],
            [(i, i * k) for i in range(student_layers + 1)])


def tinybert(student_q: Sequence[Optional[torch.Tensor]], student_k: Sequence[Optional[torch.Tensor]],
             teacher_q: Sequence[Optional[torch.Tensor]], teacher_k: Sequence[Optional[torch.Tensor]],
             student_hidden: Sequence[Optional[torch.Tensor]], teacher_hidden: Sequence[Optional[torch.Tensor]],
             attention_mask: Optional[torch.Tensor] = None, proj: Optional[nn.Linear] = None,
             formulation: str = "canonical", backend: str = "auto") -> StrategyLoss:
    """TinyBERT general distillation from per-layer Q/K [B, h, L, d] and hidden states [B, L, H].

    ``student_q``/``student_k`` have one entry per student layer (M), ``student_hidden`` M + 1
    (embeddings first); likewise the teacher with N layers. ``proj`` (Hs -> Ht) is TinyBERT's
    ``fit_dense``, required when widths differ in the canonical formulation.
    canonical (huawei-noah/Pretrained-Language-Model TinyBERT/general_distill.py):
      sum over the uniform map of score MSE (masked keys 0 on both sides) -> part ``attention``;
      sum over hidden pairs of MSE(proj(h_s), h_t) over non-pad tokens -> part ``hidden``.
    paper: last-layer score MSE in fp32 with masked keys zeroed (``attention``; the study's code
      zeroes every score <= -100, unmasked ones too), last hidden MSE with padding included and
      no projection (``hidden``), first-layer score MSE over all entries, masked keys included
      (``embedding``).
    """
    att_pairs, hid_pairs = tinybert_layer_map(len(student_q), len(teacher_q), formulation)
    if len(student_k) != len(student_q) or len(teacher_k) != len(teacher_q):
        raise ValueError(f"student_k/teacher_k: expected one entry per layer like *_q ({len(student_q)}, "
                         f"{len(teacher_q)}), got {len(student_k)}, {len(teacher_k)}")
    if len(student_hidden) != len(student_q) + 1 or len(teacher_hidden) != len(teacher_q) + 1:
        raise ValueError(f"student_hidden/teacher_hidden: expected layers + 1 entries (embeddings first) = "
                         f"{len(student_q) + 1}, {len(teacher_q) + 1}, got {len(student_hidden)}, "
                         f"{len(teacher_hidden)}")

    def scores(i: int, j: int, include_masked_keys: bool = False, fp32: bool = False) -> torch.Tensor:
        qs, ks = _needed("student_q", student_q, i), _needed("student_k", student_k, i)
        qt, kt = _needed("teacher_q", teacher_q, j), _needed("teacher_k", teacher_k, j)
        if fp32:
            qs, ks, qt, kt = _fp32(qs), _fp32(ks), _fp32(qt), _fp32(kt)
        return attention_score_mse(qs, ks, qt, kt, key_mask=attention_mask,
                                   include_masked_keys=include_masked_keys, backend=backend)

    def hidden(i: int, j: int, projection: Optional[nn.Linear], mask: Optional[torch.Tensor]) -> torch.Tensor:
        return hidden_mse(_needed("student_hidden", student_hidden, i),
                          _needed("teacher_hidden", teacher_hidden, j), projection, mask, backend=backend)

    if formulation == "paper":
        (last_s, last_t), (first_s, first_t) = att_pairs
        (hid_s, hid_t), = hid_pairs
        return _total({"attention": scores(last_s, last_t, fp32=True),
                       "hidden": hidden(hid_s, hid_t, None, None),
                       "embedding": scores(first_s, first_t, include_masked_keys=True, fp32=True)})
    attention = sum(scores(i, j) for i, j in att_pairs)
    rep = sum(hidden(i, j, proj, attention_mask) for i, j in hid_pairs)
    return _total({"attention": attention, "hidden": rep})


def _heads_to_width(x: torch.Tensor) -> torch.Tensor:
    """[B, h, L, d] -> [B, L, h*d] (a view when x is a transposed [B, L, H] tensor)."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


def minilm(student_q: torch.Tensor, student_k: torch.Tensor, student_v: torch.Tensor, teacher_q: torch.Tensor,
           teacher_k: torch.Tensor, teacher_v: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
           formulation: str = "canonical", backend: str = "auto") -> StrategyLoss:
    """MiniLM (v1) from the last layers' Q/K/V [B, h, L, d] (equal h, any d_s, d_t).

    ``attention`` = attention_kl(q/k, masked keys excluded, mean over valid query rows);
    ``value`` = relation_kl(V, relation heads = h); both formulations are this one loss. The
    study's code instead averages over all B*h*L query rows, padded ones included (docs/losses.md).
    """
    check.choice("formulation", formulation, FORMULATIONS)
    check.tensor("student_v", student_v, ndim=4)
    check.tensor("teacher_v", teacher_v, ndim=4)
    heads = student_q.shape[1]
    if teacher_q.dim() == 4 and teacher_q.shape[1] != heads:
        raise ValueError(f"teacher_q: expected the student's {heads} attention heads (MiniLM v1 matches heads; "
                         f"use minilm_v2 for different head counts), got {teacher_q.shape[1]}")
    attention = attention_kl(student_q, student_k, teacher_q, teacher_k, key_mask=attention_mask, backend=backend)
    value = relation_kl(_heads_to_width(student_v), _heads_to_width(teacher_v), heads,
                        key_mask=attention_mask, backend=backend)
    return _total({"attention": attention, "value": value})


def minilm_v2_defaults(teacher_layers: int, teacher_width: int, teacher_heads: int,
                       formulation: str = "canonical") -> tuple[int, int]:
    """(teacher layer 0-based, relation heads) the study uses by default.

    canonical: relation heads 48 for width 768, 64 for width 1024 (else the teacher's heads);
    teacher layer = last for <= 12 layers, else the upper-middle layer 7/8 deep (21 of 24, as in
    MiniLMv2's BERT-large setting). paper: last layer, relation heads = teacher heads.
    """
    check.choice("formulation", formulation, FORMULATIONS)
    if formulation == "paper":
        return teacher_layers - 1, teacher_heads
    heads = {768: 48, 1024: 64}.get(teacher_width, teacher_heads)
    layer = teacher_layers if teacher_layers <= 12 else (teacher_layers * 7) // 8
    return layer - 1, heads


def minilm_v2(student_q: torch.Tensor, student_k: torch.Tensor, student_v: torch.Tensor, teacher_q: torch.Tensor,
              teacher_k: torch.Tensor, teacher_v: torch.Tensor, num_relation_heads: int,
              attention_mask: Optional[torch.Tensor] = None, formulation: str = "canonical",
              backend: str = "auto") -> StrategyLoss:
    """MiniLMv2 from one student and one teacher layer's Q/K/V with heads concatenated, [B, L, H].

    Parts ``qq``, ``kk``, ``vv`` = relation_kl(x_s, x_t, num_relation_heads) summed.
    canonical (microsoft/unilm minilm): padded keys excluded, mean over valid rows.
    paper: no padding mask; mean over B * A_r * L rows (the study's code only for equal head counts:
    its reshape mixes tokens and heads otherwise).
    """
    check.choice("formulation", formulation, FORMULATIONS)
    key_mask = attention_mask if formulation == "canonical" else None
    parts = {}
    for name, xs, xt in (("qq", student_q, teacher_q), ("kk", student_k, teacher_k), ("vv", student_v, teacher_v)):
        parts[name] = relation_kl(xs, xt, num_relation_heads, key_mask=key_mask, backend=backend)
    return _total(parts)
