"""Sparse teacher targets (cached top-K or sampled ids with weights) for the chunked vocabulary-KD driver.

A row's target is p̂(v) = Σ_k w_k [ids_k = v] over its K entries (ids -1 are padding). The existing
row kernels compute soft CE / KL against p = softmax(t / T); filling the teacher chunk with
``t = T·log(p̂ / max p̂)`` at the ids and -inf elsewhere makes p = p̂ / S exactly, S = Σ p̂. Scaling the
row's KD coefficient (and its loss) by S then gives

- soft CE: S·(-Σ p log q) = -Σ p̂ log q,   d/ds = (S·q - p̂) / T;
- KL:      S·KL(p || q) + S log S = Σ p̂ log p̂ - Σ p̂ log q (same gradient);

with q = softmax(s / T): the dense formulas restricted to the support, no kernel change.
Rows with S = 0 get a uniform teacher (finite) and a zero coefficient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseTargets:
    """Validated targets of N rows, prepared once per call (all float64 work is [N, K])."""

    ids: torch.Tensor       # [N, K] int64, -1 = padding
    log_rel: torch.Tensor   # [N, K] float64, log(p̂(id) / max p̂) per entry (duplicates share it), -inf for 0
    mass: torch.Tensor      # [N] float64, S = Σ p̂

    @classmethod
    def prepare(cls, ids: torch.Tensor, weights: torch.Tensor) -> "SparseTargets":
        ids = ids.long()
        valid = ids >= 0
        w = torch.where(valid, weights.double(), torch.zeros((), dtype=torch.float64, device=ids.device))
        same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None]  # [N, K, K] duplicate ids of a row
        merged = (same.double() * w[:, None, :]).sum(2)  # p̂ at each entry's id
        top = merged.amax(1, keepdim=True)
        log_rel = (merged / torch.where(top > 0, top, torch.ones_like(top))).log()
        return cls(ids=ids, log_rel=log_rel, mass=w.sum(1))

    def kl_offset(self) -> torch.Tensor:
        """[N] float64 log S (0 where S = 0): KL's term added per unit of the row's KD scale."""
        return torch.where(self.mass > 0, self.mass, torch.ones_like(self.mass)).log()

    def fill(self, t: torch.Tensor, index: slice | torch.Tensor, temperature: float) -> None:
        """Write the teacher logits of rows ``index`` into ``t`` [C, V] fp32 (any strides):
        T·log(p̂ / max p̂) at the ids, -inf elsewhere; rows with S = 0 all 0."""
        ids, log_rel, mass = self.ids[index], self.log_rel[index], self.mass[index]
        t.fill_(float("-inf"))
        rows, cols = (ids >= 0).nonzero(as_tuple=True)
        t.index_put_((rows, ids[rows, cols]), (temperature * log_rel[rows, cols]).float())
        empty = mass <= 0
        if bool(empty.any()):
            t[empty] = 0.0
