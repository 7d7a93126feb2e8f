"""The MLM-head probe: one intrinsic measure comparable across every arm, including those that never
train their MLM head (TinyBERT, MiniLM).

A fresh linear head [H -> V] (seeded) is trained on the frozen encoder's last-layer states at
masked positions of training sequences, for a fixed budget (``steps`` Adam steps of ``batch``
positions), then its cross-entropy is taken at masked positions of held-out sequences. Masking:
``MASK_FRACTION`` of the non-special positions of each sequence, chosen by a seeded generator (the
same positions for every model), all replaced by [MASK]. Lower is better. The per-position losses
are the ``Scores`` (metric ``mean``), so arms are compared on the same held-out positions.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from kdfast.eval import encode
from kdfast.eval.stats import Scores

MASK_FRACTION = 0.15


def masked(sequences: torch.Tensor, mask_id: int, special: Sequence[int], seed: int
           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked ids [N, L], positions [P, 2], original ids [P]) with a seeded choice of positions."""
    generator = torch.Generator().manual_seed(seed)
    ids = sequences.long().clone()
    eligible = ~torch.isin(ids, torch.tensor(list(special)))
    chosen = (torch.rand(ids.shape, generator=generator) < MASK_FRACTION) & eligible
    positions = chosen.nonzero()
    labels = ids[chosen]
    ids[chosen] = mask_id
    return ids, positions, labels


def describe(steps: int, batch: int) -> str:
    return (f"MLM-head probe: fresh linear head on frozen last-layer states, {steps} Adam steps of {batch} masked "
            f"positions, held-out cross-entropy (nats) per masked position; lower is better")


def evaluate(model_path: str, train: torch.Tensor, heldout: torch.Tensor, mask_id: int, special: Sequence[int],
             device: torch.device, steps: int = 200, batch: int = 512, lr: float = 3e-3, seed: int = 0) -> Scores:
    """Per-position held-out losses [1, P] of the head trained on ``train`` [N, L] sequences."""
    model, tokenizer = encode.load_encoder(model_path, device)
    vocab = len(tokenizer)
    train_ids, train_pos, train_labels = masked(train, mask_id, special, seed)
    test_ids, test_pos, test_labels = masked(heldout, mask_id, special, seed + 1)
    x_train = encode.token_features(model, train_ids, train_pos, device).to(device)
    x_test = encode.token_features(model, test_ids, test_pos, device).to(device)
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(x_train.shape[1], vocab).to(device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * x_train.shape[1] ** -0.5)
        head.bias.zero_()
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)  # standardised like the sentence probes
    labels = train_labels.to(device)
    for _ in range(steps):
        pick = torch.randint(0, x_train.shape[0], (batch,), generator=generator).to(device)
        loss = torch.nn.functional.cross_entropy(head((x_train[pick] - mean) / std), labels[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(head((x_test - mean) / std), test_labels.to(device),
                                                   reduction="none")
    return Scores(losses.cpu().numpy()[None, :], None, "mean")
