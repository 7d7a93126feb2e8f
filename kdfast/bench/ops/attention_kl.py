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
from kdfast import _backends
from kdfast.reference.attention_kl import attention_kl as reference_loss

FULL_LENGTHS = (128, 512, 2048)


def full_lengths() -> tuple[int, ...]:
    """L of the full run: 128, 512, 2048, or the comma-separated KDFAST_BENCH_LENGTHS (e.g. "512")."""
    chosen = os.environ.get("KDFAST_BENCH_LENGTHS", "")
    return tuple(int(v) for v in chosen.split(",") if v.strip()) or FULL_LENGTHS


KERNEL_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}


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


def _grads(loss: torch.Tensor, x: dict) -> tuple:
    return (loss.detach(), *torch.autograd.grad(loss, (x["q_s"], x["k_s"])))


def _eager(x: dict) -> tuple:
    return _grads(eager_loss(**x), x)


_compiled = {}


def _compile(x: dict) -> tuple:
    fn = _compiled.setdefault("eager", torch.compile(eager_loss, dynamic=False))
    return _grads(fn(**x), x)


def _kdfast(backend: str) -> Callable[[dict], tuple]:
    return lambda x: _grads(kdfast.attention_kl(x["q_s"], x["k_s"], x["q_t"], x["k_t"], backend=backend), x)


def _floor(x: dict) -> tuple:
    with torch.no_grad():
        return (torch.matmul(x["q_s"], x["k_s"].transpose(-1, -2)), torch.matmul(x["q_t"], x["k_t"].transpose(-1, -2)))


def available_kernel_backends(op: str, device: torch.device) -> list[str]:
    """The kernel backends of ``op`` that can run on ``device`` here."""
    return [b for b in KERNEL_BACKENDS.get(device.type, ())
            if _backends.backend_ready(b, device) is None and _backends.implemented(op, b)]


def impls(device: torch.device) -> dict[str, Callable[[dict], tuple]]:
    found = {f"kdfast:{b}": _kdfast(b) for b in available_kernel_backends("attention_kl", device)}
    return {**found, "eager": _eager, "compile": _compile, "floor": _floor}


def reference(x: dict) -> tuple:
    """float64, one batch row at a time (a float64 [h, L, L] at most), rescaled to the full mean."""
    batch = x["q_s"].shape[0]
    loss, grads = 0.0, ([], [])
    for b in range(batch):
        leaves = [x[n][b:b + 1].detach().double().requires_grad_() for n in ("q_s", "k_s")]
        part = reference_loss(*leaves, x["q_t"][b:b + 1].double(), x["k_t"][b:b + 1].double()) / batch
        for store, grad in zip(grads, torch.autograd.grad(part, leaves)):
            store.append(grad)
        loss += part.item()
    return (torch.tensor(loss, dtype=torch.float64), *(torch.cat(g) for g in grads))
