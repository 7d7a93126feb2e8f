"""Benchmark op ``relation_kl``: MiniLMv2 self-attention relation KL from x [B, L, H] split into
A_r relation heads, fwd+bwd, returning (loss, d x_s).

Impls as for attention_kl (kdfast per backend, eager in MiniLMv2's style, compile, floor = the two
relation matmuls). ``long_context(device)`` measures the kdfast peak memory at L=8192, where eager
and the float64 reference would need tens of GB.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

import kdfast
from kdfast.bench import measure
from kdfast.bench.ops._common import available_kernel_backends, loss_and_grads, per_row_reference, standard_impls
from kdfast.bench.ops.attention_kl import full_lengths
from kdfast.reference.relation_kl import relation_kl as reference_loss

LONG_LENGTH = 8192


def shapes(quick: bool, device: torch.device) -> list[dict]:
    if quick:
        return [{"B": 2, "L": 128, "H": 768, "A_r": 12}]
    return [{"B": 8, "L": length, "H": 768, "A_r": 12} for length in full_lengths()]


def inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    size = (shape["B"], shape["L"], shape["H"])
    return {"x_s": torch.randn(size, device=device).to(dtype).requires_grad_(),
            "x_t": torch.randn(size, device=device).to(dtype), "heads": shape["A_r"]}


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, length, width = x.shape
    return x.view(b, length, heads, width // heads).permute(0, 2, 1, 3)


def eager_loss(x_s, x_t, heads: int) -> torch.Tensor:
    """MiniLMv2's code: both [B, A_r, L, L] relation tensors, fp32 softmaxes, KL summed over rows."""
    b, length, _ = x_s.shape
    s, t = _split(x_s, heads), _split(x_t, heads)
    rel_s = torch.matmul(s, s.transpose(-1, -2)).float() / s.shape[-1] ** 0.5
    with torch.no_grad():
        rel_t = torch.matmul(t, t.transpose(-1, -2)).float() / t.shape[-1] ** 0.5
    return F.kl_div(F.log_softmax(rel_s, dim=-1), F.softmax(rel_t, dim=-1), reduction="sum") / (b * heads * length)


_grads = loss_and_grads("x_s")


def _kdfast(backend: str) -> Callable[[dict], tuple]:
    return lambda x: _grads(kdfast.relation_kl(x["x_s"], x["x_t"], x["heads"], backend=backend), x)


def _floor(x: dict) -> tuple:
    with torch.no_grad():
        s, t = _split(x["x_s"], x["heads"]), _split(x["x_t"], x["heads"])
        return torch.matmul(s, s.transpose(-1, -2)), torch.matmul(t, t.transpose(-1, -2))


def impls(device: torch.device) -> dict[str, Callable[[dict], tuple]]:
    return standard_impls("relation_kl", device, _kdfast, eager_loss, _grads, _floor)


def reference(x: dict) -> tuple:
    """float64, one batch row at a time, rescaled to the full mean."""
    return per_row_reference(x, ("x_s",), lambda r: reference_loss(r["x_s"], r["x_t"], r["heads"]))


def long_context(device: torch.device, dtype: torch.dtype, batch: int = 8) -> list[dict]:
    """kdfast relation_kl fwd+bwd at L=8192 (B=8, H=768, A_r=12): peak MB of one call per kernel backend
    (memory only: on 2 CPU cores one call takes minutes, so it is not timed)."""
    shape = {"B": batch, "L": LONG_LENGTH, "H": 768, "A_r": 12}
    torch.manual_seed(0)
    x = inputs(shape, dtype, device)
    return [{"op": "relation_kl", "impl": "kdfast", "backend": backend, "shape": shape,
             "dtype": str(dtype).replace("torch.", ""), "median_ms": None,
             "peak_mb": round(measure.peak_mb(partial(_kdfast(backend), x), device), 2), "max_rel_err": None}
            for backend in available_kernel_backends("relation_kl", device)]
