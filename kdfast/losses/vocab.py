"""Vocabulary-level KD: temperature KL / soft CE on logits, and the same fused with both LM heads.

Shapes: N rows (tokens), V vocabulary, Hs/Ht student/teacher hidden widths.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdfast import _backends
from kdfast import _checks as check
from kdfast._reduction import KINDS, REDUCTIONS, kd_term
from kdfast.functions import vocab_parallel
from kdfast.losses.types import KDOutput


def _check_options(temperature: float, kind: str, reduction: str, backend: str, beta: float) -> "tuple[float, float]":
    """Validated (temperature, beta)."""
    check.choice("kind", kind, KINDS)
    check.choice("reduction", reduction, REDUCTIONS)
    check.choice("backend", backend, ("auto",) + _backends.BACKENDS)
    return check.positive("temperature", temperature), check.unit_interval("beta", beta)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
          mask: Optional[torch.Tensor] = None, kind: str = "kl", reduction: str = "batchmean",
          t2_scale: bool = True, backend: str = "auto", beta: float = 0.5) -> torch.Tensor:
    """A divergence between p = softmax(t/T) (teacher) and q = softmax(s/T) (student) over rows of
    [N, V] logits, times T**2 when ``t2_scale``. ``kind``: ``"kl"`` KL(p || q), ``"soft_ce"``
    -sum p log q, ``"reverse_kl"`` KL(q || p), ``"jsd"`` the generalised JSD of GKD (Agarwal et al.
    2024): beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q for 0 < beta < 1, and as in
    TRL's ``generalized_jsd_loss`` and Liger's ``LigerJSD`` forward KL(p || q) at beta = 0 and reverse
    KL(q || p) at beta = 1 (``beta`` in [0, 1] is read by ``"jsd"`` only). See docs/losses.md.

    ``mask`` [N] keeps rows (True). ``batchmean`` divides by kept rows, ``mean`` by kept rows x V,
    ``sum`` not at all. The teacher is a constant. No kept rows gives 0 with zero gradients.
    """
    temperature, beta = _check_options(temperature, kind, reduction, backend, beta)
    check.tensor("student_logits", student_logits, ndim=2)
    check.tensor("teacher_logits", teacher_logits, ndim=2)
    check.shape("teacher_logits", teacher_logits, tuple(student_logits.shape), "[N, V] of student_logits")
    device = check.same_device(("student_logits", "teacher_logits"), (student_logits, teacher_logits))
    mask = check.mask("mask", mask, (student_logits.shape[0],), device, "[N]")
    check.finite("student_logits", student_logits)
    check.finite("teacher_logits", teacher_logits)
    kwargs = dict(student_logits=student_logits, teacher_logits=teacher_logits, temperature=temperature,
                  mask=mask, kind=kind, reduction=reduction, t2_scale=bool(t2_scale), beta=beta)
    return _backends.call("kd_kl", device, backend, **kwargs)


def _check_logit_maps(student_softcap, student_logit_scale, teacher_softcap, teacher_logit_scale) -> dict:
    """Validated softcaps (None or > 0) and logit scales (> 0), as keyword arguments."""
    out = {}
    for who, cap, scale in (("student", student_softcap, student_logit_scale),
                            ("teacher", teacher_softcap, teacher_logit_scale)):
        out[f"{who}_softcap"] = None if cap is None else check.positive(f"{who}_softcap", cap)
        out[f"{who}_logit_scale"] = check.positive(f"{who}_logit_scale", scale)
    return out


def _check_teacher_targets(value: object, rows: int, vocab: int, kind: str, teacher: dict) -> tuple:
    """Sparse targets (ids [N, K] int, -1 = padding; weights [N, K] float, finite, >= 0) given
    instead of every tensor in ``teacher`` (name -> value); returns (ids int64, weights)."""
    given = [name for name, v in teacher.items() if v is not None]
    if given:
        raise ValueError(f"teacher_targets: expected alone, without {', '.join(given)} (sparse targets replace the "
                         f"teacher head), got both")
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"teacher_targets: expected a pair (ids [N, K], weights [N, K]), got {type(value).__name__}")
    check.choice("kind", kind, ("kl", "soft_ce"))
    ids, weights = value
    check.tensor("teacher_targets[0] (ids)", ids, ndim=2, dtypes=(torch.int64, torch.int32, torch.int16))
    check.tensor("teacher_targets[1] (weights)", weights, ndim=2)
    if ids.shape[0] != rows or ids.shape[1] < 1:
        raise ValueError(f"teacher_targets[0] (ids): expected shape [N={rows}, K >= 1], got {tuple(ids.shape)}")
    check.shape("teacher_targets[1] (weights)", weights, tuple(ids.shape), "[N, K] of the ids")
    if check.values_checked() and ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= vocab):
        bad = ids[(ids < -1) | (ids >= vocab)][0].item()
        raise ValueError(f"teacher_targets[0] (ids): expected values in [0, {vocab}) or -1 (padding), got {bad}")
    check.finite("teacher_targets[1] (weights)", weights)
    if check.values_checked() and bool((weights < 0).any()):
        raise ValueError(f"teacher_targets[1] (weights): expected values >= 0, got {weights.min().item()}")
    return ids.long(), weights


def fused_linear_kd(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                    teacher_hidden: Optional[torch.Tensor] = None,
                    teacher_weight: Optional[torch.Tensor] = None, student_bias: Optional[torch.Tensor] = None,
                    teacher_bias: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                    ignore_index: int = -100, temperature: float = 1.0, kd_weight: float = 1.0,
                    mlm_weight: float = 0.0, kind: str = "kl", reduction: str = "batchmean",
                    t2_scale: bool = True, mask: Optional[torch.Tensor] = None,
                    row_weights: Optional[torch.Tensor] = None, teacher_topk: Optional[int] = None,
                    teacher_targets: Optional[tuple] = None, backend: str = "auto", beta: float = 0.5,
                    student_softcap: Optional[float] = None, student_logit_scale: float = 1.0,
                    teacher_softcap: Optional[float] = None, teacher_logit_scale: float = 1.0,
                    process_group: Optional[object] = None) -> KDOutput:
    """Vocabulary KD plus MLM cross-entropy through both LM heads, without [N, V] logits in memory
    on the kernel backends.

    Student logits are ``student_hidden [N, Hs] @ student_weight[V, Hs]^T + student_bias[V]``,
    teacher logits likewise from [N, Ht] and [V, Ht]; products accumulate in fp32.
    KD rows: ``mask`` [N] if given, else rows whose ``labels`` != ``ignore_index``, else all.
    MLM rows: rows whose ``labels`` != ``ignore_index`` (CE on the raw student logits, a mean over
    them, or a sum for ``reduction="sum"``). ``row_weights`` [N] scale each KD row.
    ``teacher_topk`` keeps the teacher's k largest logits (renormalised) as the soft target (not with
    ``kind="reverse_kl"``: KL(q || p) is infinite where p = 0). ``kind`` and ``beta``: see :func:`kd_kl`.
    ``teacher_targets=(ids [N, K], weights [N, K])`` replaces the teacher head (``teacher_hidden``,
    ``teacher_weight``, ``teacher_bias`` and ``teacher_topk`` then None): the soft target of row n is
    p̂ = Σ_k weights[n, k]·onehot(ids[n, k]) (ids -1 are padding; cached top-K probabilities or
    importance-weighted samples, docs/teacher_cache.md), the KD row is -Σ p̂ log q (``soft_ce``) or
    Σ p̂ (log p̂ - log q) (``kl``), q = softmax(student logits / T) over the full vocabulary.
    Softcapped / rescaled heads (Gemma 2, Cohere, Granite): each side's logits are
    ``cap * tanh((h @ W^T + b) * logit_scale / cap)`` when its ``*_softcap`` is set, else
    ``(h @ W^T + b) * logit_scale``; temperature, KD, MLM CE and T² act on them (docs/losses.md).
    Returns ``KDOutput(loss, kd, mlm)`` with ``loss = kd_weight*kd + mlm_weight*mlm``.
    The teacher tensors are constants: they receive no gradient.

    Vocabulary-parallel heads: both heads' weights (and biases) as DTensors with placement ``Shard(0)``,
    or as this rank's plain ``[V_r, H]`` shards with ``process_group=``; hidden states, labels, mask and
    row weights the same on every rank. Every rank gets the whole loss and d hidden, and the gradient of
    its own shard; only ``[N]``-sized row statistics and d hidden cross the wire
    (``kdfast/functions/vocab_parallel.py``, docs/losses.md).
    """
    # Long only by the public signature and its reference docstring; the checks are the _check_* helpers.
    temperature, beta = _check_options(temperature, kind, reduction, backend, beta)
    sharded = vocab_parallel.shard_heads(student_weight, teacher_weight, student_bias, teacher_bias, process_group,
                                         student_hidden, teacher_hidden)
    shards = None
    if sharded is not None:
        shards, local = sharded
        student_weight, teacher_weight = local["student_weight"], local["teacher_weight"]
        student_bias, teacher_bias = local.get("student_bias"), local.get("teacher_bias")
        student_hidden = local.get("student_hidden", student_hidden)
        teacher_hidden = local.get("teacher_hidden", teacher_hidden)
    kd_weight = check.non_negative("kd_weight", kd_weight)
    mlm_weight = check.non_negative("mlm_weight", mlm_weight)
    maps = _check_logit_maps(student_softcap, student_logit_scale, teacher_softcap, teacher_logit_scale)
    rows, vocab = _check_student_head(student_hidden, student_weight, shards)
    teacher_targets, teachers = _check_teacher_side(teacher_targets, teacher_hidden, teacher_weight, teacher_bias,
                                                    teacher_topk, maps, kind, rows, student_weight.shape[0], vocab)
    device = _check_row_inputs(student_hidden, student_weight, teachers, teacher_targets is not None, student_bias,
                               teacher_bias, row_weights)
    teacher_topk = _check_topk(teacher_topk, vocab, kind, beta)
    labels, mask = _check_labels(labels, mask, ignore_index, mlm_weight, rows, vocab, device)
    for name, value in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden),
                        ("student_weight", student_weight), ("teacher_weight", teacher_weight)):
        if value is not None:
            check.finite(name, value)
    kwargs = dict(student_hidden=student_hidden, student_weight=student_weight, teacher_hidden=teacher_hidden,
                  teacher_weight=teacher_weight, student_bias=student_bias, teacher_bias=teacher_bias,
                  labels=labels, ignore_index=ignore_index, temperature=temperature, kd_weight=kd_weight,
                  mlm_weight=mlm_weight, kind=kind, reduction=reduction, t2_scale=bool(t2_scale), mask=mask,
                  row_weights=row_weights, teacher_topk=teacher_topk, teacher_targets=teacher_targets, beta=beta,
                  **maps)
    if sharded is not None:
        return vocab_parallel.fused_linear_kd(shards, _shard_row_kernel(device, backend, kwargs), **kwargs)
    return _backends.call("fused_linear_kd", device, backend, **kwargs)


def _check_student_head(student_hidden: torch.Tensor, student_weight: torch.Tensor, shards) -> "tuple[int, int]":
    """Validated student states [N, Hs] and head [V, Hs] (this rank's [V_r, Hs] of ``shards``, or
    ``shards`` None); returns (N, V)."""
    check.tensor("student_hidden", student_hidden, ndim=2)
    check.tensor("student_weight", student_weight, ndim=2)
    rows, width_s = student_hidden.shape
    local_vocab = student_weight.shape[0]  # V, or this rank's V_r of sharded heads
    check.shape("student_weight", student_weight, (local_vocab, width_s), "[V, Hs] matching student_hidden's Hs")
    check.same_dtype(("student_hidden", "student_weight"), (student_hidden, student_weight))
    return rows, local_vocab if shards is None else shards.vocab


def _check_teacher_side(teacher_targets, teacher_hidden, teacher_weight, teacher_bias, teacher_topk, maps: dict,
                        kind: str, rows: int, local_vocab: int, vocab: int) -> tuple:
    """Validated sparse targets, or teacher states [N, Ht] and head [V, Ht] (V_r rows when sharded);
    returns (the targets as (ids int64, weights) or None, the teacher's tensors for the device check)."""
    if teacher_targets is not None:
        teacher_targets = _check_teacher_targets(
            teacher_targets, rows, vocab, kind, dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                                                     teacher_bias=teacher_bias, teacher_topk=teacher_topk,
                                                     teacher_softcap=maps["teacher_softcap"],
                                                     teacher_logit_scale=None if maps["teacher_logit_scale"] == 1
                                                     else maps["teacher_logit_scale"]))
        return teacher_targets, teacher_targets
    if teacher_hidden is None and teacher_weight is None:
        raise ValueError("teacher_targets: expected (ids, weights) when teacher_hidden and teacher_weight are "
                         "None, got None")
    check.tensor("teacher_hidden", teacher_hidden, ndim=2)
    check.tensor("teacher_weight", teacher_weight, ndim=2)
    check.shape("teacher_hidden", teacher_hidden, (rows, None), "[N, Ht] with the N of student_hidden")
    check.shape("teacher_weight", teacher_weight, (local_vocab, teacher_hidden.shape[1]),
                "[V, Ht] with the V of student_weight and the Ht of teacher_hidden")
    check.same_dtype(("teacher_hidden", "teacher_weight"), (teacher_hidden, teacher_weight))
    return None, (teacher_hidden, teacher_weight)


def _check_row_inputs(student_hidden, student_weight, teachers: tuple, sparse: bool, student_bias, teacher_bias,
                      row_weights) -> torch.device:
    """One device for every tensor, then validated biases [V] (V_r when sharded) and ``row_weights`` [N];
    returns the device."""
    names = ("student_hidden", "student_weight", "teacher_targets[0]" if sparse else "teacher_hidden",
             "teacher_targets[1]" if sparse else "teacher_weight", "student_bias", "teacher_bias", "row_weights")
    device = check.same_device(names, (student_hidden, student_weight, *teachers, student_bias, teacher_bias,
                                       row_weights))
    for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if bias is not None:
            check.tensor(name, bias, ndim=1)
            check.shape(name, bias, (student_weight.shape[0],), "[V]")
            check.finite(name, bias)
    if row_weights is not None:
        check.tensor("row_weights", row_weights, ndim=1)
        check.shape("row_weights", row_weights, (student_hidden.shape[0],), "[N]")
        check.finite("row_weights", row_weights)
    return device


def _check_topk(teacher_topk: Optional[int], vocab: int, kind: str, beta: float) -> Optional[int]:
    """None, or the validated ``teacher_topk`` capped at V (refused with a reverse-KL term)."""
    if teacher_topk is None:
        return None
    if isinstance(teacher_topk, bool) or not isinstance(teacher_topk, int) or not 0 < teacher_topk:
        raise ValueError(f"teacher_topk: expected None or an int in [1, V={vocab}], got {teacher_topk!r}")
    teacher_topk = min(teacher_topk, vocab)
    if kd_term(kind, beta) == "reverse_kl" and teacher_topk < vocab:
        raise ValueError(f"teacher_topk: expected None with kind='reverse_kl' or kind='jsd' at beta=1 (KL(q || p) "
                         f"is infinite where the top-k teacher has p = 0; kind='jsd' at beta < 1 or 'kl' take "
                         f"top-k targets), got {teacher_topk}")
    return teacher_topk


def _check_labels(labels, mask, ignore_index: object, mlm_weight: float, rows: int, vocab: int,
                  device: torch.device) -> tuple:
    """Validated (labels [N] or None, mask [N] or None); labels are required when ``mlm_weight`` is set."""
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    labels = check.labels("labels", labels, rows, vocab, ignore_index, device)
    mask = check.mask("mask", mask, (rows,), device, "[N]")
    if mlm_weight and labels is None:
        raise ValueError(f"labels: expected a [N] label tensor because mlm_weight={mlm_weight}, got None")
    return labels, mask


def _shard_row_kernel(device: torch.device, backend: str, kwargs: dict):
    """The row kernel of the backend that serves ``fused_linear_kd`` on these arguments (``auto``: as for
    unsharded heads); vocabulary-parallel heads run it on each shard's chunks."""
    name = _backends.pick("fused_linear_kd", device, backend, **kwargs)
    return _backends._module("fused_linear_kd", name).rows


class KDKLLoss(nn.Module):
    """Module form of :func:`kd_kl`; holds the options."""

    def __init__(self, temperature: float = 1.0, kind: str = "kl", reduction: str = "batchmean",
                 t2_scale: bool = True, backend: str = "auto", beta: float = 0.5):
        super().__init__()
        _check_options(temperature, kind, reduction, backend, beta)
        self.options = dict(temperature=temperature, kind=kind, reduction=reduction, t2_scale=t2_scale,
                            backend=backend, beta=beta)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return kd_kl(student_logits, teacher_logits, mask=mask, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`fused_linear_kd`; holds the options, takes hidden states and heads."""

    def __init__(self, temperature: float = 1.0, kd_weight: float = 1.0, mlm_weight: float = 0.0,
                 kind: str = "kl", reduction: str = "batchmean", t2_scale: bool = True, ignore_index: int = -100,
                 teacher_topk: Optional[int] = None, backend: str = "auto", beta: float = 0.5,
                 student_softcap: Optional[float] = None, student_logit_scale: float = 1.0,
                 teacher_softcap: Optional[float] = None, teacher_logit_scale: float = 1.0,
                 process_group: Optional[object] = None):
        super().__init__()
        _check_options(temperature, kind, reduction, backend, beta)
        maps = _check_logit_maps(student_softcap, student_logit_scale, teacher_softcap, teacher_logit_scale)
        self.options = dict(temperature=temperature, kd_weight=kd_weight, mlm_weight=mlm_weight, kind=kind,
                            reduction=reduction, t2_scale=t2_scale, ignore_index=ignore_index,
                            teacher_topk=teacher_topk, backend=backend, beta=beta, **maps)
        if process_group is not None:
            self.options["process_group"] = process_group

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
                student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                row_weights: Optional[torch.Tensor] = None, teacher_targets: Optional[tuple] = None) -> KDOutput:
        return fused_linear_kd(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                               teacher_bias, labels=labels, mask=mask, row_weights=row_weights,
                               teacher_targets=teacher_targets, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
