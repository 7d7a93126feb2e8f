"""Benchmark op ``hidden_mse``: TinyBERT hidden-state MSE with a learnable projection Hs -> Ht and a
token mask, fwd+bwd, returning (loss, d h_s, d weight, d bias).

Impls: ``kdfast:<backend>`` per kernel backend available (gradients formed in the forward, one pass
over the projected rows), ``eager`` (the published style: ``F.linear`` then ``F.mse_loss`` over the
kept tokens), ``compile`` (torch.compile of eager), ``floor`` (the projection matmuls: y = x W^T,
d x = g W, d W = g^T x).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

import kdfast
from kdfast.bench.ops._common import standard_impls
from kdfast.reference.hidden_mse import hidden_mse as reference_loss

FULL_LENGTHS = (128, 512, 2048)


def shapes(quick: bool, device: torch.device) -> list[dict]:
    if quick:
        return [{"B": 2, "L": 128, "Hs": 312, "Ht": 768}]
    return [{"B": 8, "L": length, "Hs": 312, "Ht": 768} for length in FULL_LENGTHS]


def inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    proj = torch.nn.Linear(shape["Hs"], shape["Ht"], device=device).to(dtype)
    mask = torch.ones(shape["B"], shape["L"], dtype=torch.bool, device=device)
    mask[:, shape["L"] * 7 // 8:] = False
    return {"h_s": torch.randn(shape["B"], shape["L"], shape["Hs"], device=device).to(dtype).requires_grad_(),
            "h_t": torch.randn(shape["B"], shape["L"], shape["Ht"], device=device).to(dtype),
            "proj": proj, "mask": mask}


def eager_loss(h_s, h_t, proj, mask) -> torch.Tensor:
    """TinyBERT's code with padding removed: project the student, ``F.mse_loss`` over kept tokens."""
    return F.mse_loss(proj(h_s)[mask].float(), h_t[mask].float())


def _grads(loss: torch.Tensor, x: dict) -> tuple:
    return (loss.detach(), *torch.autograd.grad(loss, (x["h_s"], x["proj"].weight, x["proj"].bias)))


def _kdfast(backend: str) -> Callable[[dict], tuple]:
    return lambda x: _grads(kdfast.hidden_mse(x["h_s"], x["h_t"], x["proj"], x["mask"], backend=backend), x)


def _floor(x: dict) -> tuple:
    with torch.no_grad():
        w, h_s = x["proj"].weight, x["h_s"].reshape(-1, x["h_s"].shape[-1])
        y = h_s @ w.t()
        return y, y @ w, y.t() @ h_s


def impls(device: torch.device) -> dict[str, Callable[[dict], tuple]]:
    return standard_impls("hidden_mse", device, _kdfast, eager_loss, _grads, _floor)


def reference(x: dict) -> tuple:
    leaves = [t.detach().double().requires_grad_() for t in (x["h_s"], x["proj"].weight, x["proj"].bias)]
    loss = reference_loss(leaves[0], x["h_t"].double(), leaves[1], leaves[2], x["mask"])
    return (loss.detach(), *torch.autograd.grad(loss, leaves))
