"""Random-sampling sparse targets are an unbiased estimate of the full-KD gradient (error ~ 1/√draws);
top-K targets are biased (error plateaus). Gradients come from kdfast.fused_linear_kd on the
sparse targets built by kdfast.cache.sparse, one row per draw (identity head: d hidden = d logits)."""
from __future__ import annotations

import math

import pytest
import torch

import kdfast
from kdfast.cache.sparse import sample, topk

V, K, REPS = 40, 4, 32
DRAWS = (16, 64, 256, 1024)


def logits(seed: int) -> "tuple[torch.Tensor, torch.Tensor]":
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g, dtype=torch.float64) * 2, torch.randn(V, generator=g, dtype=torch.float64) * 2


def kd_grads(s: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """[R, V] d/ds of the soft CE -Σ p̂ log softmax(s/T), one row per target row."""
    hidden = s.expand(ids.shape[0], V).clone().requires_grad_(True)
    out = kdfast.fused_linear_kd(hidden, torch.eye(V, dtype=torch.float64), temperature=temperature, kind="soft_ce",
                                 reduction="sum", t2_scale=False, teacher_targets=(ids, weights.double()))
    (grad,) = torch.autograd.grad(out.loss, hidden)
    return grad


def errors(s, t, temperature, make_targets) -> list[float]:
    """RMS over REPS of ‖mean of n per-draw gradients − full gradient‖ for each n in DRAWS."""
    full = (torch.softmax(s / temperature, 0) - torch.softmax(t / temperature, 0)) / temperature
    out = []
    for n in DRAWS:
        ids, weights = make_targets(t.expand(REPS * n, V))
        grads = kd_grads(s, ids, weights, temperature).view(REPS, n, V).mean(1)
        out.append(float(((grads - full) ** 2).sum(1).mean().sqrt()))
    return out


def slope(errs: list[float]) -> float:
    x = torch.tensor([math.log(n) for n in DRAWS], dtype=torch.float64)
    y = torch.tensor([math.log(e) for e in errs], dtype=torch.float64)
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


@pytest.mark.parametrize("temperature,proposal", [(1.0, None), (2.0, None), (1.0, 2.0)])
def test_sampled_targets_converge_like_one_over_sqrt_draws(temperature, proposal):
    s, t = logits(0)
    g = torch.Generator().manual_seed(1)
    errs = errors(s, t, temperature, lambda rows: sample(rows, K, temperature, proposal, generator=g))
    assert -0.6 < slope(errs) < -0.4, errs
    ratio = math.sqrt(errs[0] / errs[2] * errs[1] / errs[3])  # n vs 16n (16/256, 64/1024): ≈ 4
    assert 3.0 < ratio < 5.3, errs
    assert errs[-1] < 0.03, errs


def test_topk_targets_are_biased_and_plateau():
    s, t = logits(0)

    def renormalised_topk(rows):
        ids, probs, _ = topk(rows, K, 1.0)
        return ids, probs / probs.sum(1, keepdim=True)

    errs = errors(s, t, 1.0, renormalised_topk)
    sampled = errors(s, t, 1.0, lambda rows: sample(rows, K, 1.0, generator=torch.Generator().manual_seed(2)))
    assert abs(slope(errs)) < 0.02, errs           # no decrease with more draws
    assert errs[-1] > 10 * sampled[-1], (errs, sampled)
