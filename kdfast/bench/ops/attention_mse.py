"""Benchmark op ``attention_mse``: TinyBERT attention-score MSE from Q/K [B, h, L, d], fwd+bwd,
returning (loss, d q_s, d k_s).

Impls: ``kdfast:<backend>`` per kernel backend available (float64 Gram algebra, no L x L tensor),
``eager`` (the published style: matmul scores for both sides, TinyBERT's mask-to-zero, ``F.mse_loss``),
``compile`` (torch.compile of eager), ``floor`` (the bare score matmuls of both sides).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

import kdfast
from kdfast.bench.ops._common import loss_and_grads, per_row_reference, qk_score_floor, standard_impls
from kdfast.reference.attention_score_mse import attention_score_mse as reference_loss

FULL_LENGTHS = (128, 512, 2048)


def shapes(quick: bool, device: torch.device) -> list[dict]:
    if quick:
        return [{"B": 2, "h": 12, "L": 128, "d": 64}]
    return [{"B": 8, "h": 12, "L": length, "d": 64} for length in FULL_LENGTHS]


def inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    size = (shape["B"], shape["h"], shape["L"], shape["d"])
    student = {name: torch.randn(size, device=device).to(dtype).requires_grad_() for name in ("q_s", "k_s")}
    teacher = {name: torch.randn(size, device=device).to(dtype) for name in ("q_t", "k_t")}
    key_mask = torch.ones(shape["B"], shape["L"], dtype=torch.bool, device=device)
    key_mask[:, shape["L"] * 7 // 8:] = False  # the last eighth is padding
    return {**student, **teacher, "key_mask": key_mask}


def eager_loss(q_s, k_s, q_t, k_t, key_mask) -> torch.Tensor:
    """TinyBERT's code: both [B, h, L, L] score tensors with the -10000 additive mask, entries <= -100
    set to 0, then ``F.mse_loss``."""
    additive = (~key_mask[:, None, None, :]).to(q_s.dtype) * -10000.0
    scores_s = torch.matmul(q_s, k_s.transpose(-1, -2)) / q_s.shape[-1] ** 0.5 + additive
    with torch.no_grad():
        scores_t = torch.matmul(q_t, k_t.transpose(-1, -2)) / q_t.shape[-1] ** 0.5 + additive
    scores_s = torch.where(scores_s <= -1e2, torch.zeros_like(scores_s), scores_s)
    scores_t = torch.where(scores_t <= -1e2, torch.zeros_like(scores_t), scores_t)
    return F.mse_loss(scores_s.float(), scores_t.float())


_grads = loss_and_grads("q_s", "k_s")


def _kdfast(backend: str) -> Callable[[dict], tuple]:
    return lambda x: _grads(kdfast.attention_score_mse(x["q_s"], x["k_s"], x["q_t"], x["k_t"], x["key_mask"],
                                                       backend=backend), x)


def impls(device: torch.device) -> dict[str, Callable[[dict], tuple]]:
    return standard_impls("attention_score_mse", device, _kdfast, eager_loss, _grads, qk_score_floor)


def reference(x: dict) -> tuple:
    """float64, one batch row at a time (a float64 [h, L, L] at most), rescaled to the full mean."""
    return per_row_reference(x, ("q_s", "k_s"),
                             lambda r: reference_loss(r["q_s"], r["k_s"], r["q_t"], r["k_t"], r["key_mask"]))
