"""The deterministic batch order shared by every arm, with epochs tracked and resumable state.

Epoch e visits the sequences in the order ``randperm(N, seed=(seed, e))``; a global batch may run across
an epoch boundary, which is how limited-data arms repeat data. Masks are drawn for the whole global
batch (so they do not depend on the world size), then each rank keeps rows ``rank::world``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable

import torch

from kdfast.data.masking import mask_tokens, seeded


@dataclass
class MaskingConfig:
    """``mode``: 'dynamic' (new masks each step) or 'static' (fixed per sequence, the study's)."""

    vocab_size: int
    mask_id: int
    special: tuple
    mode: str = "dynamic"
    prob: float = 0.15
    max_predictions: int = 20

    def __post_init__(self) -> None:
        if self.mode not in ("dynamic", "static"):
            raise ValueError(f"data.masking: expected 'dynamic' or 'static', got {self.mode!r}")


def make_batch(ids: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The batch dict models take: input_ids, attention_mask, token_type_ids, labels (all [B, L] int64)."""
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
            "labels": labels}


def mask_rows(rows: torch.Tensor, indices: Iterable[int], step: int, seed: int,
              masking: MaskingConfig) -> Dict[str, torch.Tensor]:
    """Mask the packed ``rows`` [B, L]: dynamic masks from (seed, step), static ones from (seed, index)."""
    if masking.mode == "dynamic":
        ids, labels = mask_tokens(rows, seeded(seed, step), masking.vocab_size, masking.mask_id,
                                  masking.special, masking.prob)
    else:
        pairs = [mask_tokens(row[None], seeded(seed, -1, int(index)), masking.vocab_size, masking.mask_id,
                             masking.special, masking.prob, masking.max_predictions)
                 for row, index in zip(rows, indices)]
        ids = torch.cat([p[0] for p in pairs])
        labels = torch.cat([p[1] for p in pairs])
    return make_batch(ids, labels)


class BatchStream:
    """Global batches of ``global_batch`` sequences; this rank gets rows ``rank::world`` of each."""

    def __init__(self, sequences: torch.Tensor, global_batch: int, masking: MaskingConfig, seed: int = 0,
                 rank: int = 0, world: int = 1):
        if sequences.dim() != 2 or sequences.shape[0] == 0:
            raise ValueError(f"sequences: expected a non-empty [N, L] tensor, got shape {tuple(sequences.shape)}")
        if global_batch % world:
            raise ValueError(f"batch_size: expected a multiple of the world size {world}, got {global_batch}")
        self.sequences = sequences
        self.global_batch = global_batch
        self.masking = masking
        self.seed = seed
        self.rank, self.world = rank, world
        self.step = 0
        self.consumed = 0  # sequences drawn in total (across epochs)
        self._order_epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    @property
    def tokens_per_batch(self) -> int:
        return self.global_batch * self.sequences.shape[1]

    @property
    def epochs(self) -> float:
        """Passes over the distinct data so far (1.5 = one and a half)."""
        return self.consumed / self.sequences.shape[0]

    def _index(self, position: int) -> int:
        n = self.sequences.shape[0]
        epoch = position // n
        if epoch != self._order_epoch:
            self._order = torch.randperm(n, generator=seeded(self.seed, epoch))
            self._order_epoch = epoch
        return int(self._order[position % n])

    def next(self) -> Dict[str, torch.Tensor]:
        """This rank's share of the next global batch, masked, with ``sequence_index`` [B] (rows of ``sequences``)."""
        indices = [self._index(self.consumed + i) for i in range(self.global_batch)]
        batch = mask_rows(self.sequences[indices], indices, self.step, self.seed, self.masking)
        batch["sequence_index"] = torch.tensor(indices, dtype=torch.long)  # a teacher cache is looked up by it
        self.consumed += self.global_batch
        self.step += 1
        return {key: value[self.rank::self.world] for key, value in batch.items()}

    def state_dict(self) -> dict:
        return {"step": self.step, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.consumed = int(state["step"]), int(state["consumed"])


def heldout_batches(sequences: torch.Tensor, batch_size: int, masking: MaskingConfig, seed: int = 1234):
    """Fixed masked batches of the held-out sequences (static masks), the same at every evaluation."""
    fixed = MaskingConfig(masking.vocab_size, masking.mask_id, masking.special, "static", masking.prob,
                          masking.max_predictions)
    for start in range(0, sequences.shape[0], batch_size):
        rows = sequences[start:start + batch_size]
        yield mask_rows(rows, range(start, start + rows.shape[0]), 0, seed, fixed)
