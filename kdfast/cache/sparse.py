"""Sparse teacher targets from teacher logits: top-K, or K ids sampled from a proposal with
importance weights (Anshumann et al., ACL 2025, "Sparse Logit Sampling: Accelerating Knowledge
Distillation in LLMs").

Target distribution p = softmax(t / T) (T: the KD temperature). ``sample``: K ids drawn i.i.d. with
replacement from the proposal r = softmax(t / τ) (τ: proposal temperature, τ = T gives r = p); each
distinct id gets w = count/K · p/r, so E[Σ_k w_k onehot(id_k)] = p (unbiased), and Σ w = 1 when r = p.
``topk``: the K largest p (renormalised by the strategy) and the leftover mass 1 - Σ top-K.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

KINDS = ("topk", "sample")


@dataclass(frozen=True)
class SparseSpec:
    """``topk:K`` or ``sample:K``; ``proposal_temperature`` only for sample (None = the KD temperature)."""

    kind: str
    k: int
    proposal_temperature: Optional[float] = None

    @classmethod
    def parse(cls, text: str, proposal_temperature: Optional[float] = None) -> "SparseSpec":
        match = re.fullmatch(r"(topk|sample):([0-9]+)", str(text).strip())
        if not match or int(match.group(2)) < 1:
            raise ValueError(f"sparse: expected 'topk:K' or 'sample:K' with an integer K >= 1, got {text!r}")
        kind = match.group(1)
        if proposal_temperature is not None:
            if kind != "sample":
                raise ValueError(f"proposal_temperature: expected None for {kind!r} (only sample draws from a "
                                 f"proposal), got {proposal_temperature}")
            if not proposal_temperature > 0:
                raise ValueError(f"proposal_temperature: expected a number > 0, got {proposal_temperature}")
        return cls(kind, int(match.group(2)), proposal_temperature)

    def __str__(self) -> str:
        return f"{self.kind}:{self.k}"

    def proposal(self, temperature: float) -> Optional[dict]:
        """What ``sample`` draws from at KD temperature T, as recorded in ``cache.json`` (None for top-K)."""
        if self.kind != "sample":
            return None
        tau = temperature if self.proposal_temperature is None else self.proposal_temperature
        return {"name": "softmax(teacher_logits / tau)", "tau": tau,
                "weights": "count/K * p/r, p = softmax(teacher_logits / temperature)"}

    def check_vocab(self, vocab: int) -> None:
        if self.k > vocab:
            raise ValueError(f"sparse: expected K <= the teacher's vocabulary size {vocab}, got K={self.k}")


def topk(logits: torch.Tensor, k: int, temperature: float) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """ids [N, K] int64, probabilities [N, K] fp32 (descending) and leftover mass [N] fp32 of
    p = softmax(logits [N, V] / T)."""
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    top = log_p.topk(k, dim=-1)
    probs = top.values.exp()
    return top.indices, probs, (1.0 - probs.double().sum(-1)).clamp_min(0).float()


def sample(logits: torch.Tensor, k: int, temperature: float, proposal_temperature: Optional[float] = None,
           generator: Optional[torch.Generator] = None) -> "tuple[torch.Tensor, torch.Tensor]":
    """ids [N, K] int64 (distinct per row, -1 padding after them) and weights [N, K] fp32
    w = count/K · p/r, from K draws with replacement from r = softmax(logits / τ) per row."""
    tau = temperature if proposal_temperature is None else proposal_temperature
    logits = logits.float()
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    log_r = log_p if tau == temperature else torch.log_softmax(logits / tau, dim=-1)
    draws = torch.multinomial(log_r.exp(), k, replacement=True, generator=generator).sort(dim=-1).values
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    counts = (draws[:, :, None] == draws[:, None, :]).sum(-1)
    ratio = (log_p.gather(1, draws) - log_r.gather(1, draws)).exp()
    weights = torch.where(first, counts / k * ratio, torch.zeros_like(ratio))
    return torch.where(first, draws, -1), weights
