"""MLM masking: choose positions, then replace 80% with [MASK], 10% with a random token, keep 10%.

Dynamic masking draws new positions for every batch from a generator seeded by (seed, step), so every
arm sees the same masks at the same step and a resumed run draws the same masks it would have.
Static masking (the study's) fixes the positions of each sequence once, from (seed, sequence index), with
at most ``max_predictions`` per sequence. Special tokens are never chosen. Labels are -100 elsewhere.
"""
from __future__ import annotations

from typing import Iterable, Tuple

import torch

IGNORE = -100


def mask_tokens(input_ids: torch.Tensor, generator: torch.Generator, vocab_size: int, mask_id: int,
                special: Iterable[int], mask_prob: float = 0.15,
                max_predictions: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Masked copy of ``input_ids`` [B, L] and labels [B, L] (int64, -100 where not predicted).

    ``max_predictions`` > 0 keeps at most that many predicted positions per sequence."""
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob: expected a number in (0, 1), got {mask_prob}")
    ids = input_ids.long()
    maskable = torch.ones_like(ids, dtype=torch.bool)
    for token in special:
        maskable &= ids != token
    scores = torch.rand(ids.shape, generator=generator)
    chosen = (scores < mask_prob) & maskable
    if max_predictions > 0:
        # keep the max_predictions chosen positions with the lowest scores
        ranked = torch.where(chosen, scores, torch.full_like(scores, 2.0))
        keep = ranked.argsort(dim=1)[:, :max_predictions]
        capped = torch.zeros_like(chosen).scatter_(1, keep, True)
        chosen &= capped
    action = torch.rand(ids.shape, generator=generator)
    random_tokens = torch.randint(vocab_size, ids.shape, generator=generator)
    masked = ids.clone()
    masked[chosen & (action < 0.8)] = mask_id
    use_random = chosen & (action >= 0.8) & (action < 0.9)
    masked[use_random] = random_tokens[use_random]
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    return masked, labels


def seeded(*parts: int) -> torch.Generator:
    """A CPU generator whose seed depends on every part (seed, step, sequence index...)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 6364136223846793005 + int(part) + 1442695040888963407) % (1 << 63)
    generator = torch.Generator()
    generator.manual_seed(value)
    return generator
