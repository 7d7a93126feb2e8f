"""Benchmark op ``attention_kl``: MiniLM attention-distribution KL from Q/K [B, h, L, d], fwd+bwd,
returning (loss, d q_s, d k_s).

Impls: ``kdfast:<backend>`` per kernel backend available, ``eager`` (the published style: matmul
scores, log_softmax/softmax, ``F.kl_div(reduction="sum")`` over B x h x L rows), ``compile``
(torch.compile of eager), ``floor`` (the two score matmuls, student and teacher).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

import kdfast
from kdfast.bench.ops._common import loss_and_grads, per_row_reference, qk_score_floor, standard_impls
from kdfast.reference.attention_kl import attention_kl as reference_loss

FULL_LENGTHS = (128, 512, 2048)


def full_lengths() -> tuple[int, ...]:
    """L of the full run: 128, 512, 2048, or the comma-separated KDFAST_BENCH_LENGTHS (e.g. "512")."""
    chosen = os.environ.get("KDFAST_BENCH_LENGTHS", "")
    return tuple(int(v) for v in chosen.split(",") if v.strip()) or FULL_LENGTHS


def shapes(quick: bool, device: torch.device) -> list[dict]:
    if quick:
        return [{"B": 2, "h": 12, "L": 128, "d": 64}]
    return [{"B": 8, "h": 12, "L": length, "d": 64} for length in full_lengths()]


def inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    size = (shape["B"], shape["h"], shape["L"], shape["d"])
    student = {name: torch.randn(size, device=device).to(dtype).requires_grad_() for name in ("q_s", "k_s")}
    teacher = {name: torch.randn(size, device=device).to(dtype) for name in ("q_t", "k_t")}
    return {**student, **teacher}


def eager_loss(q_s, k_s, q_t, k_t) -> torch.Tensor:
    """MiniLM's code: both [B, h, L, L] score tensors, fp32 softmaxes, KL summed over rows."""
    b, h, length, _ = q_s.shape
    scores_s = torch.matmul(q_s, k_s.transpose(-1, -2)).float() / q_s.shape[-1] ** 0.5
    with torch.no_grad():
        scores_t = torch.matmul(q_t, k_t.transpose(-1, -2)).float() / q_t.shape[-1] ** 0.5
    return F.kl_div(F.log_softmax(scores_s, dim=-1), F.softmax(scores_t, dim=-1), reduction="sum") / (b * h * length)


_grads = loss_and_grads("q_s", "k_s")


def _kdfast(backend: str) -> Callable[[dict], tuple]:
    return lambda x: _grads(kdfast.attention_kl(x["q_s"], x["k_s"], x["q_t"], x["k_t"], backend=backend), x)


def impls(device: torch.device) -> dict[str, Callable[[dict], tuple]]:
    return standard_impls("attention_kl", device, _kdfast, eager_loss, _grads, qk_score_floor)


def reference(x: dict) -> tuple:
    """float64, one batch row at a time (a float64 [h, L, L] at most), rescaled to the full mean."""
    return per_row_reference(x, ("q_s", "k_s"), lambda r: reference_loss(r["q_s"], r["k_s"], r["q_t"], r["k_t"]))
